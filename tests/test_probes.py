"""``python -m forwarder probe live|ready``: cheap, and true to the worker's consumer loop under both pools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.demo import send
from devtools.servers import free_port, wait_for, worker_env
from forwarder.cli import main as cli_main
from forwarder.health import HealthFiles, beat_interval, check_live, check_ready

POOLS = ["prefork", "gevent"]
MAX_AGE = 3.0


def probe(which: str, health_dir: Path, max_age: float = MAX_AGE, **env: str) -> subprocess.CompletedProcess[str]:
    """The probe exactly as Kubernetes runs it (exec), in the worker's environment."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "probe", which],
        env=worker_env(**{"FORWARDER_HEALTH_DIR": str(health_dir), "FORWARDER_LIVENESS_MAX_AGE": f"{max_age:g}", **env}),
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


def passes(which: str, health_dir: Path) -> bool:
    return probe(which, health_dir).returncode == 0


def fails(which: str, health_dir: Path) -> bool:
    return probe(which, health_dir).returncode == 1


# ------------------------------------------------------------------------------------- the files


def test_live_needs_a_recent_beat_and_ready_needs_the_mark_too(tmp_path):
    files = HealthFiles(str(tmp_path / "health"))
    files.reset()
    assert check_live(files, 3)[0] is False  # no beat yet
    files.beat()
    assert check_live(files, 3) == (True, "live: last heartbeat 0.0s ago")
    assert check_ready(files, 3)[0] is False  # not consuming yet
    files.mark_ready()
    assert check_ready(files, 3) == (True, "ready")
    old = time.time() - 10
    os.utime(files.dir / "live", (old, old))
    live, line = check_live(files, 3)
    assert not live and "last heartbeat 10." in line and "max 3s" in line
    assert check_ready(files, 3)[0] is False  # a stale beat is not ready either
    files.mark_stopping()  # warm shutdown: not ready, live until the process exits
    assert check_ready(files, 3) == (False, "not ready: shutting down")
    assert check_live(files, 3)[0] is True
    files.reset()  # the next start forgets all of it
    assert not any(files.dir.iterdir())


def test_the_beat_comes_several_times_within_the_max_age():
    assert beat_interval(60) == 10 and beat_interval(3) == 0.75 and beat_interval(1) == 0.25


def test_probe_exit_statuses_and_one_line(tmp_path):
    done = probe("live", tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no heartbeat" in done.stderr
    (tmp_path / "live").touch()
    done = probe("live", tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("forwarder: live")
    assert probe("ready", tmp_path).returncode == 1
    (tmp_path / "ready").touch()
    assert probe("ready", tmp_path).returncode == 0
    bad = probe("live", tmp_path, FORWARDER_LIVENESS_MAX_AGE="soon")
    assert bad.returncode == 2 and "FORWARDER_LIVENESS_MAX_AGE" in bad.stderr and "Traceback" not in bad.stderr
    assert probe("live", tmp_path, FORWARDER_HEALTH_DIR="relative").returncode == 2
    # The same code through the command-line parser (``--help`` lists it).
    assert cli_main(["probe", "ready"], {"FORWARDER_HEALTH_DIR": str(tmp_path)}) == 0
    assert cli_main(["probe", "live"], {"FORWARDER_HEALTH_DIR": str(tmp_path / "none")}) == 1


@pytest.mark.parametrize("pool", POOLS)
def test_the_probe_loads_neither_celery_nor_gevent_nor_the_settings(pool, tmp_path):
    (tmp_path / "live").touch()
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['forwarder', 'probe', 'live']\n"
        "try:\n"
        "    runpy.run_module('forwarder', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    print(json.dumps({'status': exc.code, 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
        env=worker_env(CELERY_WORKER_POOL=pool, FORWARDER_HEALTH_DIR=str(tmp_path)),
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 0, done.stderr
    heavy = {name for name in report["modules"]
             if name.partition(".")[0] in {"celery", "kombu", "gevent", "redis", "requests", "gateways", "socket"}
             or name in {"forwarder.settings", "forwarder.cli"}}
    assert not heavy, sorted(heavy)


# -------------------------------------------------------------------------- against real workers


def start(start_worker, pool: str, health_dir: Path, **env: str):
    return start_worker(pool, FORWARDER_HEALTH_DIR=str(health_dir), FORWARDER_LIVENESS_MAX_AGE=f"{MAX_AGE:g}", **env)


@pytest.mark.parametrize("pool", POOLS)
def test_a_healthy_worker_is_live_and_ready(pool, start_worker, tmp_path):
    start(start_worker, pool, tmp_path)
    wait_for(lambda: passes("ready", tmp_path), 10, "probe ready to pass")
    time.sleep(MAX_AGE + 1)  # an idle worker keeps beating
    assert passes("live", tmp_path)
    assert passes("ready", tmp_path)


@pytest.mark.parametrize("pool", POOLS)
def test_a_stopped_worker_fails_live_until_it_continues(pool, start_worker, producer, model, queue, tmp_path):
    worker = start(start_worker, pool, tmp_path)
    wait_for(lambda: passes("ready", tmp_path), 10, "probe ready to pass")
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        time.sleep(MAX_AGE + 1)
        done = probe("live", tmp_path)
        assert done.returncode == 1 and "last heartbeat" in done.stderr, done.stdout + done.stderr
        assert fails("ready", tmp_path)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_for(lambda: passes("live", tmp_path), 5, "probe live to pass again")
    assert passes("ready", tmp_path)
    assert send(producer, {"args": {"id": 1}}, queue=queue).get(timeout=30)["status_code"] == 200


@pytest.mark.parametrize("pool", POOLS)
def test_a_worker_whose_every_slot_runs_a_long_task_stays_live(pool, start_worker, producer, model, queue, tmp_path):
    model.behaviour.delay = 10
    start(start_worker, pool, tmp_path, CELERY_WORKER_CONCURRENCY="2")
    results = [send(producer, {"args": {"id": i}}, queue=queue) for i in range(2)]
    wait_for(lambda: model.behaviour.in_flight == 2, 20, "both slots busy")
    deadline = time.monotonic() + 2 * MAX_AGE  # twice the max age, every slot busy all along
    while time.monotonic() < deadline:
        done = probe("live", tmp_path)
        assert done.returncode == 0, done.stderr
        assert model.behaviour.in_flight == 2  # still busy: the probe ran while every slot was taken
        time.sleep(0.5)
    assert [r.get(timeout=30)["status_code"] for r in results] == [200, 200]


@pytest.mark.parametrize("pool", POOLS)
def test_ready_fails_as_soon_as_a_warm_shutdown_starts(pool, start_worker, producer, model, queue, tmp_path):
    model.behaviour.delay = 10
    worker = start(start_worker, pool, tmp_path)
    wait_for(lambda: passes("ready", tmp_path), 10, "probe ready to pass")
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    wait_for(lambda: model.behaviour.in_flight == 1, 20, "the task to reach the model")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: fails("ready", tmp_path), 3, "probe ready to fail")
    assert worker.process is not None and worker.process.poll() is None  # still finishing its task
    assert model.behaviour.in_flight == 1
    time.sleep(MAX_AGE + 0.5)  # the warm shutdown outlasts the max age: still live (the grace period bounds it)
    assert passes("live", tmp_path)
    assert fails("ready", tmp_path)
    assert worker.process.poll() is None and model.behaviour.in_flight == 1  # all of that during the shutdown
    assert worker.wait(30) == 0
    assert result.get(timeout=5)["status_code"] == 200


def test_a_new_worker_clears_a_previous_containers_health_files_before_waiting_for_the_model(tmp_path):
    # A previous container in the same pod left `ready` and a fresh heartbeat in the emptyDir
    health = tmp_path / "health"
    health.mkdir()
    for name in ("ready", "live", "stopping"):
        (health / name).touch()
    env = worker_env(FORWARDER_HEALTH_DIR=str(health), FORWARDER_READY_TIMEOUT="30",
                     FORWARDER_HEALTHCHECK_URL=f"http://127.0.0.1:{free_port()}/readyz")  # the model is not up
    assert probe("ready", health).returncode == 0  # what the new container's startup probe would see
    process = subprocess.Popen([sys.executable, "-m", "forwarder"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while any((health / name).exists() for name in ("ready", "live", "stopping")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(p.name for p in health.iterdir()) == []
        assert process.poll() is None  # still waiting for the model
        assert probe("ready", health).returncode == 1 and probe("live", health).returncode == 1
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_unwritable_health_folder_stops_the_worker_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "forwarder"], capture_output=True, text=True, timeout=60,
                          env=worker_env(FORWARDER_HEALTH_DIR=str(blocker / "health"), FORWARDER_READY_TIMEOUT="0"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "FORWARDER_HEALTH_DIR=" in line and "cannot be written" in line


def test_probe_without_its_argument_prints_a_usage_line(tmp_path):
    for command in ([sys.executable, "-m", "forwarder", "probe"],):
        done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                              env=worker_env(FORWARDER_HEALTH_DIR=str(tmp_path)))
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert lines[0] == "usage: python -m forwarder probe {live,ready}", lines
        assert "name the probe: live" in lines[1] and "required: check" not in done.stderr
    with pytest.raises(SystemExit) as exited:  # the same through the full command line
        cli_main(["probe"], {"FORWARDER_HEALTH_DIR": str(tmp_path)})
    assert exited.value.code == 2
