"""The README and the Makefile say what the code does: the generated environment table, the layout, the
switching guide's defaults, the targets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from devtools.docs import BEGIN, END, env_table
from forwarder.settings import VARS, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_env_table_matches_settings():
    text = README.read_text(encoding="utf-8")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == env_table(), "README.md is stale: run python -m devtools.docs"


def layout_paths(text: str) -> list[str]:
    """The paths the README's Layout table names (``forwarder/a.py``, ``b.py`` in one cell: forwarder/b.py)."""
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = []
    for row in (line for line in layout.splitlines() if line.startswith("| `")):
        base = ""
        for item in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if "/" in item.rstrip("/"):
                base = item.rsplit("/", 1)[0]
                named.append(item)
            else:
                named.append(f"{base}/{item}" if base and not item.endswith("/") and "." in item else item)
    return named


def test_the_layout_table_names_every_module_once_and_nothing_that_is_gone():
    named = layout_paths(README.read_text(encoding="utf-8"))
    assert len(named) == len(set(named)), sorted(n for n in named if named.count(n) > 1)
    root = README.parent
    modules = {str(p.relative_to(root)) for p in (root / "forwarder").glob("*.py") if p.name != "__init__.py"}
    assert modules - set(named) == set(), "modules missing from the README's Layout table"
    assert [n for n in named if not (root / n.rstrip("/")).exists()] == []


def test_the_switching_guide_states_the_firehose_pool_default_the_settings_use():
    text = README.read_text(encoding="utf-8")
    var = next(v for v in VARS if v.name == "FIREHOSE_CLIENT_MAX_POOL_CONNECTIONS")
    unset = re.search(r"\(unset: ([^)]*)\)", var.help).group(1)  # type: ignore[union-attr]
    guide = text.split("## Switching from llm-engine's forwarder", 1)[1]
    [row] = [line for line in guide.splitlines() if line.startswith("| `FIREHOSE_CLIENT_MAX_POOL_CONNECTIONS`")]
    assert f"unset: {unset}" in row, row
    assert Settings.from_env({"CELERY_WORKER_POOL": "gevent", "CELERY_WORKER_CONCURRENCY": "100"}).firehose_pool_size == 108
    assert Settings.from_env({}).firehose_pool_size == 10


def makefile_targets() -> tuple[set[str], set[str]]:
    text = (README.parent / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY: (.*)$", text, re.M).group(1).split())  # type: ignore[union-attr]
    documented = set(re.findall(r"^([a-z-]+):.*## ", text, re.M))
    return phony, documented


def test_phony_names_exactly_the_documented_targets():
    phony, documented = makefile_targets()
    assert phony == documented, (phony - documented, documented - phony)


def test_make_capacity_writes_only_untracked_files():
    root = README.parent
    done = subprocess.run(["make", "-n", "capacity"], cwd=root, capture_output=True, text=True, timeout=60)
    [command] = [line for line in done.stdout.splitlines() if "bench.capacity" in line]
    out = re.search(r"--out (\S+)", command)
    assert out, f"make capacity writes into bench/results (tracked): {command}"
    for name in ("capacity.json", "capacity.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{out.group(1)}/{name}"], cwd=root, timeout=60)
        assert ignored.returncode == 0, f"{out.group(1)}/{name} is not ignored by git"
