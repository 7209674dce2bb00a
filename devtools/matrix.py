"""``make matrix``: the suite's fast half plus one real worker per pool, on the oldest and the newest dependencies
that pyproject.toml's ranges allow.

Per set, uv resolves ``requirements.in`` (the same ranges as pyproject ``dependencies``) together with the test
tools pinned at their locked versions (requirements-dev.txt) into ``constraints/<set>.txt``:

* ``oldest``: ``--resolution lowest-direct``, every runtime requirement at the lowest version its range (and the
  other requirements) allow; what they pull in at the newest that fits.
* ``newest``: the default resolution, every requirement at the newest its range allows.

The set is synced exactly into its own venv, ``.matrix/<set>`` (gitignored), the key libraries' versions are
printed, and ``pytest -m "not integration or smoke"`` runs in that venv. ``--frozen`` skips the resolution and
installs the committed ``constraints/<set>.txt`` as it is (offline with a warm uv cache).
The lock (requirements.txt) is not touched: CI and the image keep running on it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {"oldest": ["--resolution", "lowest-direct"], "newest": []}
#: The libraries whose versions each run prints: the ones the worker's behaviour depends on.
KEY = ["celery", "kombu", "billiard", "redis", "urllib3", "requests", "boto3", "botocore", "pycurl", "gevent",
       "greenlet", "ddtrace"]
MARKERS = "not integration or smoke"


def tools_pinned(out: Path) -> Path:
    """requirements-dev.in's tools at their requirements-dev.txt versions (the runtime libraries left free)."""
    pins = {}
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[normal(name)] = version
    lines = []
    for line in (ROOT / "requirements-dev.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # `-c requirements.txt`: the point is to not use the lock
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?", line)
        assert match, line
        name, extras = match.groups()
        lines.append(f"{name}{extras or ''}=={pins[normal(name)]}")
    out.write_text("\n".join(lines) + "\n")
    return out


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *KEY], capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def one(name: str, uv: str, frozen: bool, pytest_args: list[str]) -> dict:
    started = time.monotonic()
    matrix = ROOT / ".matrix"
    matrix.mkdir(exist_ok=True)
    constraints = ROOT / "constraints" / f"{name}.txt"
    if not frozen:
        tools = tools_pinned(matrix / "tools.in")
        run([uv, "pip", "compile", "-q", "--python-version", "3.11", "--strip-extras", "--no-emit-index-url",
             "--custom-compile-command", "make matrix", *SETS[name], "requirements.in",
             str(tools.relative_to(ROOT)), "-o", str(constraints.relative_to(ROOT))])
    venv = matrix / name
    python = venv / "bin" / "python"
    if not python.exists():
        run([uv, "venv", "-q", "--seed", "--python", sys.executable, str(venv)])
    run([uv, "pip", "sync", "-q", "--python", str(python), str(constraints)])
    installed = time.monotonic()
    found = versions(python)
    print(f"\n=== {name}: " + "  ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    log = venv / "pytest.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(python), "-m", "pytest", "-m", MARKERS, "-q", *pytest_args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        summary = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
            if re.match(r"^=* ?\d+ (passed|failed|error|deselected).* in [\d.]+s", line):
                summary = line.strip("= \n")
        code = proc.wait()
    return {"set": name, "versions": found, "passed": code == 0, "summary": summary or f"pytest exit {code}",
            "install_s": round(installed - started), "test_s": round(time.monotonic() - installed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", choices=list(SETS), help="only this set (repeatable)")
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--frozen", action="store_true", help="install constraints/<set>.txt without resolving")
    args, pytest_args = parser.parse_known_args(argv)
    results = [one(name, args.uv, args.frozen, pytest_args) for name in (args.set or list(SETS))]
    print("\n=== make matrix")
    for r in results:
        print(f"{r['set']:>7}: {'PASS' if r['passed'] else 'FAIL'}  {r['summary']}  "
              f"(install {r['install_s']} s, tests {r['test_s']} s)")
        print("         " + "  ".join(f"{k} {v}" for k, v in r["versions"].items()))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
