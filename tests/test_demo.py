"""``make demo`` (``python -m devtools.demo``) shows every outcome a user meets, and ends with its table;
``python -m forwarder demo`` (the runtime, which never imports devtools) points there."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.servers import worker_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_the_demo_shows_every_outcome_and_ends_with_a_table(pool):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "devtools.demo", "--pool", pool], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "SUCCESS status_code=200" in out  # a success, stored as llm-engine stores it
    assert "SUCCESS status_code=422" in out  # a model 4xx, stored as a result with its status code
    assert "FAILURE ModelResponseError, custom: error=" in out and "error_metadata='Internal failure'" in out
    assert "== callbacks received by the caller's endpoint" in out and " FAILURE model server answered" in out
    assert out.count("task finished: task_id=") == 8
    assert "forwarder summary: done=" in out and "model_p50_ms=" in out
    assert "probe ready: exit 0: forwarder: ready" in out
    table = out.split("\nwhat ", 1)[1].splitlines()[1:8]
    assert [row.split()[0] for row in table] == ["successes", "model", "failure", "callbacks", "task", "summary", "probe"]
    assert all(row.endswith(" yes") for row in table), table
    assert elapsed < 30, f"the demo took {elapsed:.1f} s (under 10 s on a warm, idle machine)"


def test_the_runtime_points_at_the_demo_and_imports_no_dev_tooling():
    done = subprocess.run([sys.executable, "-m", "forwarder", "demo", "--pool", "gevent"], cwd=ROOT, env=worker_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "make demo" in done.stderr and "python -m devtools.demo" in done.stderr
