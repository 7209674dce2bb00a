"""The project as a package: licensed, its dependencies declared as the ranges the lock satisfies, and a wheel
that installs into a clean virtualenv and runs (``celery-forwarder``) from outside the checkout.

The wheel test is offline: the wheel is built without build isolation (the dev venv's setuptools) and
installed with ``--no-deps --no-index`` into a fresh venv whose only other packages are the locked runtime
requirements, reached through a ``.pth`` file to the dev venv's site-packages. ``pip check`` in that venv then
proves the wheel's ``Requires-Dist`` is satisfied by the lock, and the commands run from a folder with no
source in it and no PYTHONPATH.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import forwarder

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What a build needs from the checkout (the rest, tests and tooling, stays out of the wheel).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "forwarder", "gateways")


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def locked() -> dict[str, str]:
    """requirements.txt's pins: normalised name -> version."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_licence_is_apache_2_and_declared():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_the_dependencies_are_requirements_in_and_the_lock_satisfies_them():
    declared = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    assert declared, "pip install would install no dependency"
    assert sorted(map(str, declared)) == sorted(map(str, requirements(ROOT / "requirements.in")))
    pins = locked()
    for requirement in declared:
        assert requirement.specifier, f"{requirement.name}: give the range the suite runs against"
        version = pins[requirement.name.lower()]
        assert requirement.specifier.contains(version), f"the lock's {requirement.name}=={version} is outside {requirement}"


def test_one_version_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "forwarder.__version__"}
    done = subprocess.run([sys.executable, "-m", "forwarder", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == f"celery-forwarder {forwarder.__version__}", done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the checkout stays clean of build/ and *.egg-info)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--disable-pip-version-check", "-w", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (work / "dist").glob("celery_forwarder-*.whl")
    return built


@pytest.mark.integration
def test_the_wheel_holds_every_module_the_licence_the_types_and_the_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_string(archive.read(metadata_name).decode())
        entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    sources = {str(p.relative_to(ROOT)) for package in ("forwarder", "gateways") for p in (ROOT / package).rglob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert {"forwarder/py.typed", "gateways/py.typed"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "devtools/", "bench/")) for n in names)
    assert metadata["Version"] == forwarder.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert sorted(metadata.get_all("Requires-Dist")) == sorted(map(str, requirements(ROOT / "requirements.in")))
    assert "celery-forwarder = forwarder.launch:main" in entry_points


@pytest.mark.integration
def test_the_wheel_installs_into_a_clean_venv_and_runs_outside_the_checkout(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The locked runtime requirements, already installed in the dev venv (offline; no PyPI needed)
    (site / "locked-requirements.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # the wheel's Requires-Dist all met

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "FORWARDER_HEALTH_DIR": str(outside / "h")}

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(command), cwd=outside, env=env, capture_output=True, text=True, timeout=120)

    where = run("python", "-c", "import forwarder, gateways; print(forwarder.__file__, gateways.__file__)")
    assert where.returncode == 0 and str(ROOT) not in where.stdout and str(site) in where.stdout, where
    version = run("celery-forwarder", "--version")
    assert version.stdout.strip() == f"celery-forwarder {forwarder.__version__}", version
    check = run("celery-forwarder", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "configuration OK" in check.stdout
    bad = run("env", "CELERY_WORKER_CONCURRENCY=0", "celery-forwarder", "check")
    assert bad.returncode == 2 and "CELERY_WORKER_CONCURRENCY" in bad.stderr, bad
    probe = run("celery-forwarder", "probe", "live")
    assert probe.returncode == 1 and "no heartbeat" in probe.stderr, probe
    usage = run("celery-forwarder", "--help")
    assert usage.stdout.startswith("usage: celery-forwarder"), usage.stdout[:200]
    assert run("python", "-m", "forwarder", "check").returncode == 0
    assert os.listdir(outside) == []  # check and probe wrote nothing
