"""The markdown report: summary.md's tables from the sections' results."""

from __future__ import annotations

from typing import Any


def summary(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    if "pools" in sections:
        data = sections["pools"]
        rows = {r["variant"]["label"]: r for r in data["rows"]}
        lines += [f"### pools ({data['model_delay_s'] * 1e3:.0f} ms model)", "",
                  "| concurrency | prefork tasks/s | gevent tasks/s | prefork RSS / USS / PSS MB | gevent RSS / USS / PSS MB "
                  "| gevent/prefork RSS | USS | PSS |", "|---|---|---|---|---|---|---|---|"]
        for ratio in data["ratios"]:
            c = ratio["concurrency"]
            pre, gev = rows[f"prefork-{c}"], rows[f"gevent-{c}"]
            mem = lambda r: " / ".join(f"{r['memory_mb'][k]:.0f}" for k in ("rss", "uss", "pss"))  # noqa: E731
            lines.append(f"| {c} | {pre['tasks_per_s']:.1f} | {gev['tasks_per_s']:.1f} | {mem(pre)} | {mem(gev)} | "
                         f"{ratio['gevent_vs_prefork_rss']:.3f} | {ratio['gevent_vs_prefork_uss']:.3f} | "
                         f"{ratio['gevent_vs_prefork_pss']:.3f} |")
        lines.append("")
    if "overhead" in sections:
        data = sections["overhead"]
        lines += [f"### overhead (concurrency {data['concurrency']}, {data['model_delay_s'] * 1e3:.0f} ms model, "
                  f"{data['tasks']} tasks, median of {data['reps']})", "",
                  "| pool | logging hook | forwarder tasks/s | bare tasks/s | bare-protocol tasks/s | forwarder / bare "
                  "| forwarder / bare-protocol | CPU ms/task forwarder / bare / bare-protocol |",
                  "|---|---|---|---|---|---|---|---|"]
        for group in data["ratios"]:
            m = group["median"]
            lines.append(
                f"| {group['pool']} | {'on' if group['hooks'] != 'none' else 'off'} | {m['forwarder']['tasks_per_s']:.1f} | "
                f"{m['bare']['tasks_per_s']:.1f} | {m['bare-protocol']['tasks_per_s']:.1f} | "
                f"{group['forwarder_vs_bare_tasks_per_s']:.2f}x | {group['forwarder_vs_bare-protocol_tasks_per_s']:.2f}x | "
                + " / ".join(f"{m[n]['cpu_ms_per_task']:.2f}" for n in ("forwarder", "bare", "bare-protocol")) + " |"
            )
        lines.append("")
    if "cost" in sections:
        lines += cost_table(sections["cost"])
    if "soak" in sections:
        data = sections["soak"]
        lines += [f"### soak (callback + logging hooks, concurrency {data['concurrency']}, "
                  f"{data['model_delay_s'] * 1e3:.0f} ms model)", "",
                  "| variant | tasks | tasks/s | RSS MB: start / after warm-up / end | slope MB per 1,000 tasks after warm-up "
                  "| warm-up tasks | callbacks | hook failures |", "|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            lines.append(f"| {row['variant']['label']} | {row['tasks']} | {row['tasks_per_s']:.1f} | "
                         f"{row['rss_start_mb']:.0f} / {row['rss_warm_mb']:.0f} / {row['rss_end_mb']:.0f} | "
                         f"{row['slope_mb_per_1000']:+.3f} | "
                         f"{row['warmup_tasks']} | {row['callbacks']} | {row['hook_failures']} |")
        base = next((r for r in data["rows"] if r["variant"]["label"] == "prefork"), None)
        for leaky in (r for r in data["rows"] if r["variant"]["program"] == "leaky" and base):
            positive = base["slope_mb_per_1000"] > 0.01 and leaky["slope_mb_per_1000"] > 0
            ratio = leaky["slope_mb_per_1000"] / base["slope_mb_per_1000"] if positive else None
            runners = base["variant"]["concurrency"] if base["variant"]["pool"] == "prefork" else 1
            per_process = (leaky["rss_warm_mb"] - base["rss_warm_mb"]) / runners
            lines += [
                "",
                f"{leaky['variant']['label']} vs prefork: slope {leaky['slope_mb_per_1000']:+.3f} vs {base['slope_mb_per_1000']:+.3f} "
                f"MB per 1,000 tasks" + (f" ({ratio:,.1f}x)" if ratio else " (no meaningful ratio)")
                + (f" = {leaky['slope_mb_per_1000'] / 1000:.1f} MB kept per task" if leaky["slope_mb_per_1000"] >= 100 else "")
                + f"; RSS after warm-up {leaky['rss_warm_mb']:.0f} vs {base['rss_warm_mb']:.0f} MB "
                f"({leaky['rss_warm_mb'] / base['rss_warm_mb']:.2f}x, {per_process:+.0f} MB per process running tasks); "
                f"throughput {leaky['tasks_per_s']:.1f} vs {base['tasks_per_s']:.1f} tasks/s "
                f"({leaky['tasks_per_s'] / base['tasks_per_s']:.2f}x)",
            ]
        lines.append("")
    if "scale" in sections:
        data = sections["scale"]
        lines += ["### scale (asyncio model; tasks = 4 x concurrency)", "",
                  "| pool | concurrency | model s | tasks/s | of the limit | RSS MB | USS MB | RSS/in-flight MB "
                  "| CPU s/1000 tasks | model saw twice | ack/pool errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            m = r["memory_mb"]
            pool = r["variant"]["pool"] + (" (bare Celery)" if r["variant"].get("program") == "bare" else "")
            lines.append(f"| {pool} | {r['concurrency']} | {r['model_delay_s']:g} | {r['tasks_per_s']:.1f} "
                         f"| {r['ratio_of_limit']:.3f} | {m['rss']:.0f} | {m['uss']:.0f} | {r['rss_per_in_flight_mb']:.2f} "
                         f"| {r['cpu_s_per_1000']:.2f} | {r['model_duplicates']} | {r['pool_errors']} |")
        for alone in data.get("model_alone", []):
            lines.append(f"\nModel alone: {alone['connections']} keep-alive connections, {alone['delay_s']:g} s: "
                         f"{alone['requests_per_s']:.0f} requests/s ({alone['ratio_of_limit']:.3f} of the limit).")
        lines.append("")
    if "sizing" in sections:
        lines += _sizing(sections["sizing"])
    return "\n".join(lines)


def _sizing(data: dict[str, Any]) -> list[str]:
    fits = data["figures"]
    lines = [f"### sizing (MiB; after a warm-up against a {data['meta']['model_delay_s'] * 1e3:.0f} ms model; "
             f"medians of {max(g['reps'] for g in data['measurements']['groups'])})", "",
             "| pool | concurrency | ddtrace-run | processes | RSS MiB | USS MiB | PSS MiB | largest child RSS MiB "
             "| launch to ready s |", "|---|---|---|---|---|---|---|---|---|"]
    for g in data["measurements"]["groups"]:
        child = f"{g['child_rss_max_mib']:.1f}" if g["child_rss_max_mib"] else "-"
        lines.append(f"| {g['pool']} | {g['concurrency']} | {'yes' if g['ddtrace'] else 'no'} | {g['processes']} "
                     f"| {g['rss_mib']:.1f} | {g['uss_mib']:.1f} | {g['pss_mib']:.1f} | {child} | {g['ready_s']:.2f} |")
    lines += ["", "| fit (under ddtrace-run), MiB | prefork main | prefork per child | gevent base | gevent per slot "
              "| ddtrace-run per process |", "|---|---|---|---|---|---|"]
    for measure in ("pss", "rss"):
        f = fits[f"{measure}_mb"]
        lines.append(f"| {measure.upper()} | {f['prefork_main']:.1f} | {f['prefork_child']:.1f} | {f['gevent_base']:.1f} "
                     f"| {f['gevent_slot']:.3f} | {f['ddtrace_per_process']:.1f} |")
    lines += ["", f"Largest prefork child RSS (ddtrace-run): {fits['child_rss_max_mb']:.1f} MiB. Launch to ready line "
              f"(ddtrace-run, median): prefork {fits['ready_seconds']['prefork']:.2f} s, "
              f"gevent {fits['ready_seconds']['gevent']:.2f} s.", ""]
    return lines


def cost_table(data: dict[str, Any]) -> list[str]:
    """The cost section's table: one row per pool and variant, ratios against bare Celery of the same run."""
    lines = [f"### cost per part ({data['model_delay_s'] * 1e3:.0f} ms model, {data['tasks']} tasks per run, "
             f"median of {data['rounds']} alternated rounds)", "",
             "| pool | variant | tasks/s | vs bare | CPU ms/task | vs bare | peak RSS MB | datagrams/task |",
             "|---|---|---|---|---|---|---|---|"]
    for group in data["groups"]:
        for label in group["order"]:
            m = group["medians"][label]
            cpu = f"{m['cpu_vs_bare']:.2f}x" if m["cpu_vs_bare"] else "-"
            lines.append(f"| {group['pool']} {group['concurrency']} | {label} | {m['tasks_per_s']:.1f} | "
                         f"{m['tasks_per_s_vs_bare']:.2f}x | {m['cpu_ms_per_task']:.2f} | {cpu} | {m['rss_mb']:.0f} | "
                         f"{m['datagrams_per_task']:.2f} |")
    lines.append("")
    return lines
