"""The shape of the house: runtime apart from dev tooling, gateways standalone, settings with one source."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from forwarder.settings import VARS, Settings

ROOT = Path(__file__).resolve().parent.parent
#: Required at runtime without being imported by the worker's own modules, and why.
NOT_IMPORTED_BUT_NEEDED = {"ddtrace": "the production launcher (ddtrace-run) itself"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every import in a module, wherever it stands (functions included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.partition(".")[0])
    return roots


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The modules among ``modules`` that ``path`` imports, wherever the import stands (functions included).

    ``from a.b import c`` names the module ``a.b.c`` when there is one, else ``a.b``; a relative import is
    resolved against the module's own package.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return (found & modules) - {name}


def import_graph(packages: Sequence[str]) -> dict[str, set[str]]:
    paths = {module_name(path): path for package in packages for path in (ROOT / package).rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (its modules, the first repeated at the end), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return []


def test_no_import_circle_among_runtime_modules():
    assert find_cycle(import_graph(["forwarder", "gateways"])) == []


def test_the_circle_check_sees_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    graph = import_graph(["forwarder", "gateways"])
    assert "forwarder.worker" in graph["forwarder.cli"]  # imported inside ``main``
    assert "forwarder.extensions.base" in graph["forwarder.extensions.probes"]


def test_gateways_import_nothing_from_forwarder_or_dev_tooling():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & {"forwarder", "devtools", "tests", "bench"})
        for path in (ROOT / "gateways").rglob("*.py")
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_runtime_never_imports_dev_tooling():
    offenders = {
        str(path.relative_to(ROOT))
        for package in ("forwarder", "gateways")
        for path in (ROOT / package).rglob("*.py")
        if imported_roots(path) & {"devtools", "tests", "bench"}
    }
    assert not offenders  # the demo is devtools' own (`make demo`): absent from the image


def test_every_runtime_module_imports_with_only_the_runtime_requirements():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "children" / "runtime_imports.py")],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"forwarder.worker", "forwarder.extensions", "gateways.s3_backend"} <= set(report["modules"])
    # Each direct runtime requirement is something the worker imports (or named above with its reason).
    direct = {
        re.split(r"[=<>\[ ;#]", line.strip(), maxsplit=1)[0].lower()
        for line in (ROOT / "requirements.in").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    unused = direct - set(report["used"]) - set(NOT_IMPORTED_BUT_NEEDED)
    assert not unused, f"in requirements.in but never imported by the worker: {sorted(unused)}"


def test_every_variable_has_one_field_and_no_field_has_a_default():
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    assert set(fields) == {var.attr for var in VARS} | {"warnings"}
    with_default = [name for name, field in fields.items()
                    if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING]
    assert not with_default, f"defaults live in settings.VARS only: {with_default}"


def test_the_image_copies_only_the_runtime():
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    assert copied == {"requirements.txt", "forwarder", "gateways"}, copied
