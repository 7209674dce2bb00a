"""Plots: one PNG per section from its results (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.workers import OVERHEAD_PROGRAMS


def plot(section: str, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if section == "pools":
        rows = {r["variant"]["label"]: r for r in data["rows"]}
        conc = [r["concurrency"] for r in data["ratios"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.38
        xs = range(len(conc))
        for offset, pool in ((-width / 2, "prefork"), (width / 2, "gevent")):
            axes[0].bar([x + offset for x in xs], [rows[f"{pool}-{c}"]["tasks_per_s"] for c in conc], width, label=pool)
        axes[0].set(title=f"throughput, {data['model_delay_s'] * 1e3:.0f} ms model", xlabel="concurrency",
                    ylabel="tasks/s", xticks=list(xs), xticklabels=[str(c) for c in conc])
        axes[0].legend()
        for i, key in enumerate(("rss", "uss", "pss")):
            w = width / 1.5
            for j, pool in enumerate(("prefork", "gevent")):
                axes[1].bar([x + (i - 1) * w + (j - 0.5) * w / 2 for x in xs],
                            [rows[f"{pool}-{c}"]["memory_mb"][key] for c in conc], w / 2,
                            label=f"{pool} {key.upper()}", color=f"C{j}", alpha=1 - 0.28 * i)
        axes[1].set(title="worker memory, summed over processes", xlabel="concurrency", ylabel="MB",
                    xticks=list(xs), xticklabels=[str(c) for c in conc], yscale="log")
        axes[1].legend(fontsize=7, ncol=3, loc="upper left")
    elif section == "overhead":
        fig, ax = plt.subplots(figsize=(10, 4.5))
        groups = data["ratios"]
        names = [name for name, _, _ in OVERHEAD_PROGRAMS]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.bar([i + (j - 1) * width for i in range(len(groups))],
                   [group["median"][name]["tasks_per_s"] for group in groups], width, label=name)
        for i, group in enumerate(groups):
            ax.annotate(f"{group['forwarder_vs_bare_tasks_per_s']:.2f}x / {group['forwarder_vs_bare-protocol_tasks_per_s']:.2f}x",
                        (i, max(group["median"][n]["tasks_per_s"] for n in names)), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8)
        ax.set(title=f"forwarder vs bare Celery (median of {data['reps']}), concurrency {data['concurrency']}, "
                     f"{data['model_delay_s'] * 1e3:.0f} ms model; ratios vs bare / bare-protocol",
               ylabel="tasks/s", xticks=list(range(len(groups))),
               xticklabels=[f"{g['pool']}\nlogging hook {'on' if g['hooks'] != 'none' else 'off'}" for g in groups])
        ax.title.set_fontsize(9)
        ax.legend(loc="lower right")
    elif section == "scale":
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        ours = [r for r in data["rows"] if r["variant"].get("program", "forwarder") == "forwarder"]
        for delay in sorted({r["model_delay_s"] for r in ours if r["variant"]["pool"] == "gevent"}):
            rows = sorted((r for r in ours if r["variant"]["pool"] == "gevent" and r["model_delay_s"] == delay),
                          key=lambda r: r["concurrency"])
            conc = [r["concurrency"] for r in rows]
            axes[0].plot(conc, [r["ratio_of_limit"] for r in rows], "o-", label=f"gevent, {delay:g} s model")
            axes[1].plot(conc, [r["memory_mb"]["rss"] for r in rows], "o-", label=f"gevent RSS, {delay:g} s model")
        for bare in (r for r in data["rows"] if r["variant"].get("program") == "bare"):
            axes[0].plot([bare["concurrency"]], [bare["ratio_of_limit"]], "k^", label=f"bare Celery, {bare['model_delay_s']:g} s")
            axes[1].plot([bare["concurrency"]], [bare["memory_mb"]["rss"]], "k^", label="bare Celery RSS")
        prefork = sorted((r for r in ours if r["variant"]["pool"] == "prefork"), key=lambda r: r["concurrency"])
        if prefork:
            axes[0].plot([r["concurrency"] for r in prefork], [r["ratio_of_limit"] for r in prefork], "s--", label="prefork")
            axes[1].plot([r["concurrency"] for r in prefork], [r["memory_mb"]["rss"] for r in prefork], "s--",
                         label="prefork RSS (reference)")
        axes[0].axhline(0.9, color="grey", lw=0.8, ls=":")
        axes[0].set(title="throughput / physical limit (concurrency / latency)", xlabel="concurrency (log)",
                    ylabel="ratio", xscale="log", ylim=(0, 1.05))
        axes[1].axhline(150, color="grey", lw=0.8, ls=":")
        axes[1].set(title="worker memory", xlabel="concurrency (log)", ylabel="MB RSS (log)", xscale="log",
                    yscale="log")
        for ax in axes:
            ax.legend(fontsize=8)
    elif section == "sizing":
        fig = _sizing(plt, data)
    elif section == "cost":
        fig = _cost(plt, data)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for row in data["rows"]:
            samples = row["rss_samples"]
            label = f"{row['variant']['label']} ({row['slope_mb_per_1000']:+.3f} MB/1k)"
            axes[0].plot([s[0] for s in samples], [s[1] for s in samples], label=label)
            base = next((s[1] for s in samples if s[0] >= row["warmup_tasks"]), samples[0][1])
            axes[1].plot([s[0] for s in samples], [s[1] - base for s in samples], label=row["variant"]["label"])
        # Log scales: the retained-client control grows by GB while the real pools move by tenths of a MB.
        axes[0].set(title="worker RSS (sum over processes), both hooks on", xlabel="tasks done", ylabel="MB (log)",
                    yscale="log")
        axes[1].set(title="RSS change since the end of warm-up", xlabel="tasks done", ylabel="MB (symlog, linear within ±1)")
        axes[1].set_yscale("symlog", linthresh=1.0)
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sizing(plt: Any, data: dict[str, Any]) -> Any:
    """Memory sums against concurrency per pool, with and without ddtrace-run, the fit lines; ready times."""
    groups, fits = data["measurements"]["groups"], data["figures"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 2, 1.3]})
    for ax, pool, (base, per) in ((axes[0], "prefork", ("prefork_main", "prefork_child")),
                                  (axes[1], "gevent", ("gevent_base", "gevent_slot"))):
        for j, measure in enumerate(("pss", "rss")):
            for ddtrace, style in ((True, "o-"), (False, "s--")):
                rows = [g for g in groups if g["pool"] == pool and g["ddtrace"] == ddtrace]
                ax.plot([g["concurrency"] for g in rows], [g[f"{measure}_mib"] for g in rows], style, color=f"C{j}",
                        alpha=1 if ddtrace else 0.55,
                        label=f"{measure.upper()}{' ddtrace-run' if ddtrace else ' plain'}")
            fit = fits[f"{measure}_mb"]
            xs = [0, max(g["concurrency"] for g in groups if g["pool"] == pool)]
            ax.plot(xs, [fit[base] + x * fit[per] for x in xs], ":", color=f"C{j}", lw=1,
                    label=f"fit {measure.upper()}: {fit[base]:.1f} + {fit[per]:.2f} x concurrency")
        ax.set(title=f"{pool}: memory after warm-up, summed over processes", xlabel="concurrency", ylabel="MiB")
        ax.legend(fontsize=7)
    labels = [f"{g['pool']} {g['concurrency']}\n{'ddtrace' if g['ddtrace'] else 'plain'}" for g in groups]
    axes[2].barh(range(len(groups)), [g["ready_s"] for g in groups], color=["C2" if g["ddtrace"] else "C7" for g in groups])
    axes[2].set(title="launch to ready line (median)", xlabel="seconds", yticks=list(range(len(groups))))
    axes[2].set_yticklabels(labels, fontsize=7)
    return fig


def _cost(plt: Any, data: dict[str, Any]) -> Any:
    """Per pool: tasks/s and CPU ms per task of each variant as a ratio of bare Celery's, RSS in MB."""
    groups = data["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    labels = groups[0]["order"]
    height = 0.8 / len(groups)
    for j, group in enumerate(groups):
        ys = [i + (j - (len(groups) - 1) / 2) * height for i in range(len(labels))]
        name = f"{group['pool']} {group['concurrency']}"
        m = group["medians"]
        axes[0].barh(ys, [m[label]["tasks_per_s_vs_bare"] for label in labels], height, label=name, color=f"C{j}")
        axes[1].barh(ys, [m[label]["cpu_vs_bare"] or 0 for label in labels], height, label=name, color=f"C{j}")
        axes[2].barh(ys, [m[label]["rss_mb"] for label in labels], height, label=name, color=f"C{j}")
    axes[0].axvline(0.95, color="grey", lw=0.8, ls=":")
    axes[1].axvline(1.15, color="grey", lw=0.8, ls=":")
    for ax, title in zip(axes, ("tasks/s / bare Celery's", "CPU ms per task / bare Celery's", "peak RSS, MB (sum)"),
                         strict=True):
        ax.set(title=title, yticks=list(range(len(labels))))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    fig.suptitle(f"cost per part: {data['model_delay_s'] * 1e3:.0f} ms model, {data['tasks']} tasks per run, "
                 f"median of {data['rounds']} alternated rounds", fontsize=10)
    return fig
