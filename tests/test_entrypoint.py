"""``python -m forwarder`` as a process: bad environments, gevent patch order, --help and check.

Monkey-patching is process-global, so each check runs in a child interpreter that reports through
its exit status; every child has a timeout so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.demo import producer as make_producer
from devtools.demo import send
from devtools.servers import WorkerProcess, free_port, worker_env
from forwarder.settings import VARS
from tests.test_settings import BAD_URLS

# A bad value for every variable that is validated (free-text ones accept anything).
BAD_VALUES = {
    "CELERY_WORKER_POOL": "threads",
    "CELERY_BROKER_URL": "amqp://guest@localhost//",
    "CELERY_RESULT_BACKEND": "rpc://",
    "CELERY_QUEUE": "",
    "CELERY_WORKER_CONCURRENCY": "0",
    "CELERY_WORKER_PREFETCH_MULTIPLIER": "-2",
    "CELERY_WORKER_MAX_TASKS_PER_CHILD": "abc",
    "CELERY_WORKER_MAX_MEMORY_PER_CHILD": "0",
    "CELERY_BROKER_VISIBILITY_TIMEOUT": "never",
    "CELERY_SQS_QUEUE_URL": "queue-name-only",
    "CELERY_SQS_WAIT_TIME_SECONDS": "-1",
    "CELERY_SQS_POLLING_INTERVAL": "soon",
    "CELERY_LOG_LEVEL": "LOUD",
    "FORWARDER_LOG_FORMAT": "yaml",
    "FORWARDER_STRICT_ENV": "strict",
    "FORWARDER_MODEL_URL": "ftp://localhost/predict",
    "FORWARDER_HEALTHCHECK_URL": "http://",
    "FORWARDER_MODEL_CONNECT_TIMEOUT": "0",
    "FORWARDER_MODEL_READ_TIMEOUT": "nan",
    "FORWARDER_READY_TIMEOUT": "-1",
    "FORWARDER_MAX_RESPONSE_BYTES": "64MiB",
    "FORWARDER_MAX_RESULT_BYTES": "0",
    "FORWARDER_RESULT_FORMAT": "xml",
    "FORWARDER_REQUEST_TTL": "0",
    "FORWARDER_MAX_DELIVERIES": "-1",
    "FORWARDER_MODEL_OUTAGE_MAX": "7200",  # not below the default visibility timeout (3600)
    "FORWARDER_RETRY_STATUSES": "429,700",
    "FORWARDER_RETRY_MAX": "many",
    "FORWARDER_RETRY_BACKOFF": "0",
    "FORWARDER_RETRY_BACKOFF_MAX": "1.5",
    "FORWARDER_HEALTH_DIR": "relative/health",
    "FORWARDER_LIVENESS_MAX_AGE": "0.5",
    "FORWARDER_HOOKS": "billing",
    "FORWARDER_ENDPOINT_CONFIG_PATH": "/nonexistent/endpoint_config",
    "FORWARDER_LABELS": "{not json",
    "FORWARDER_CALLBACK_URL": "javascript:alert(1)",
    "FORWARDER_CALLBACK_TIMEOUT": "0",
    "FORWARDER_CALLBACK_RETRIES": "0",
    "FORWARDER_CALLBACK_SIGNING_SECRET": "not-a-whsec-secret",
    "FIREHOSE_SESSION_DURATION": "100000",
    "FIREHOSE_REFRESH_LEEWAY": "-5",
    "FIREHOSE_CLIENT_MAX_POOL_CONNECTIONS": "0",
    "FORWARDER_METRICS": "maybe",
    "FORWARDER_SUMMARY_INTERVAL": "-1",
    "FORWARDER_STUCK_AFTER": "0",
    "DD_DOGSTATSD_PORT": "70000",
    "DD_DOGSTATSD_URL": "tcp://localhost:8125",
    "FORWARDER_MEMORY_DEBUG": "perhaps",
    "FORWARDER_MEMORY_DEBUG_INTERVAL": "0",
    "FORWARDER_MEMORY_DEBUG_TOP": "ten",
}
FREE_TEXT = {
    "FORWARDER_ENDPOINT_ID", "FORWARDER_ENDPOINT_NAME", "FORWARDER_ENDPOINT_USER_ID", "FORWARDER_ENDPOINT_TYPE",
    "FORWARDER_BUNDLE_ID", "DD_AGENT_HOST",
    "FORWARDER_CALLBACK_AUTH_USERNAME", "FORWARDER_CALLBACK_AUTH_PASSWORD", "FIREHOSE_STREAM_NAME",
    "FIREHOSE_ROLE_ARN", "FORWARDER_CALLBACK_ALLOWED_HOSTS", "AWS_REGION",
}


def run_forwarder(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args], env=worker_env(**env), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def test_every_validated_variable_has_a_bad_value_here():
    assert {var.name for var in VARS} == set(BAD_VALUES) | FREE_TEXT


@pytest.mark.parametrize(("name", "value"), sorted(BAD_VALUES.items()))
def test_invalid_env_stops_the_worker_with_one_line_and_status_2(name, value):
    # FORWARDER_READY_TIMEOUT=0 and an unreachable broker: had validation passed, the worker would
    # try to run (and keep retrying the broker until the timeout); it must stop before that.
    unreachable = f"redis://127.0.0.1:{free_port()}"
    env = {"FORWARDER_READY_TIMEOUT": "0", "CELERY_BROKER_URL": f"{unreachable}/0",
           "CELERY_RESULT_BACKEND": f"{unreachable}/1"}
    done = run_forwarder(**{**env, name: value})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0]
    assert "Traceback" not in done.stderr


def test_help_lists_every_variable_with_its_default():
    done = run_forwarder("--help")
    assert done.returncode == 0
    for var in VARS:
        assert var.name in done.stdout
    assert "default: http://localhost:5005/predict" in done.stdout


def test_check_validates_and_exits_without_starting():
    done = run_forwarder("check", CELERY_WORKER_POOL="gevent", CELERY_WORKER_MAX_TASKS_PER_CHILD="5")
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout
    assert "no effect under the gevent pool" in done.stdout


# The child installs an import hook, then runs the real entry point (``check``), then imports the
# whole worker. It records whether socket and ssl were already patched when each watched library
# was first imported, and whether ssl was imported before the patch. Exit 0 only if all is well.



def run_child(script: str, pool: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / "children" / script)],
        env=worker_env(CELERY_WORKER_POOL=pool), capture_output=True, text=True, timeout=60,
    )


def test_gevent_patches_socket_and_ssl_before_any_network_library():
    done = run_child("patch_order.py", "gevent")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "patched first" in done.stdout


def test_prefork_never_imports_gevent():
    done = run_child("prefork_imports.py", "prefork")
    assert done.returncode == 0, done.stdout + done.stderr


def check_with_open_files(soft: int, hard: int, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m forwarder check`` in a process whose RLIMIT_NOFILE is (soft, hard)."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "check"], env=worker_env(**env), capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )


def test_an_open_file_limit_too_low_for_the_concurrency_stops_the_worker_naming_both_numbers():
    done = check_with_open_files(256, 256, CELERY_WORKER_POOL="gevent", CELERY_WORKER_CONCURRENCY="1024")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "CELERY_WORKER_CONCURRENCY=1024" in lines[0] and "3136" in lines[0] and "256" in lines[0], lines[0]


def test_a_low_soft_open_file_limit_is_raised_to_the_hard_one():
    done = check_with_open_files(128, 4096, CELERY_WORKER_POOL="gevent", CELERY_WORKER_CONCURRENCY="256")
    assert done.returncode == 0, done.stderr
    assert "open-file limit raised from 128 to 4096 (needed about 832)" in done.stderr


# ------------------------------------------------------------------------------------------ URLs and names


@pytest.mark.parametrize(("name", "value", "reason"), BAD_URLS)
def test_a_url_check_refuses_stops_check_and_the_worker_with_one_masked_line(name, value, reason):
    for command in (("check",), ()):  # `check`, and the worker itself: never a traceback
        done = run_forwarder(*command, FORWARDER_READY_TIMEOUT="0", **{name: value})
        assert done.returncode == 2, (command, done.stdout, done.stderr[-2000:])
        (line,) = done.stderr.strip().splitlines()
        assert name in line and reason in line, line
        assert "hunter2" not in line and "Traceback" not in done.stderr


def test_check_names_a_misspelt_variable_and_strict_env_refuses_it():
    done = run_forwarder("check", FORWARDER_HOOK="callback", FORWARDER_MODEL_READ_TIMOUT="60",
                         CELERY_WORKER_CONCURENCY="8", CELERY_RDBSIG="1", DD_ENV="prod")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stdout.splitlines() if "is not a variable this worker reads" in line]
    assert warned == [
        "forwarder: warning: CELERY_WORKER_CONCURENCY is not a variable this worker reads (did you mean "
        "CELERY_WORKER_CONCURRENCY?); ignored",
        "forwarder: warning: FORWARDER_HOOK is not a variable this worker reads (did you mean FORWARDER_HOOKS?); ignored",
        "forwarder: warning: FORWARDER_MODEL_READ_TIMOUT is not a variable this worker reads (did you mean "
        "FORWARDER_MODEL_READ_TIMEOUT?); ignored",
    ]
    strict = run_forwarder("check", FORWARDER_HOOK="callback", FORWARDER_STRICT_ENV="1")
    assert strict.returncode == 2
    assert strict.stderr.strip() == ("forwarder: configuration error: FORWARDER_HOOK is not a variable this worker "
                                     "reads (did you mean FORWARDER_HOOKS?) (FORWARDER_STRICT_ENV=1)")


def test_the_worker_names_a_misspelt_variable_once_at_start():
    # No model listening: the worker logs its configuration and warnings, then gives up waiting (exit 3)
    done = run_forwarder(FORWARDER_HOOK="callback", FORWARDER_READY_TIMEOUT="0.5",
                         FORWARDER_HEALTHCHECK_URL=f"http://127.0.0.1:{free_port()}/readyz")
    assert done.returncode == 3, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "FORWARDER_HOOK is not a variable" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "did you mean FORWARDER_HOOKS?" in warned[0], warned


def test_urls_and_choices_check_passes_run_the_worker(redis_server, model, queue):
    # An upper-case scheme with no db (0), the highest default db for the results, an upper-case pool
    results = f"{redis_server.url}/15"
    broker = "REDIS" + redis_server.url[len("redis"):]
    env = worker_env(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=results, CELERY_QUEUE=queue,
                     CELERY_WORKER_POOL="GEVENT", CELERY_LOG_LEVEL="info", FORWARDER_LOG_FORMAT="JSON",
                     FORWARDER_MODEL_URL=f"{model.url}/predict", FORWARDER_HEALTHCHECK_URL=f"{model.url}/readyz")
    assert subprocess.run([sys.executable, "-m", "forwarder", "check"], env=env, capture_output=True,
                          timeout=60).returncode == 0
    worker = WorkerProcess(env).start(timeout=60)
    app = make_producer(f"{redis_server.url}/0", results)
    try:
        assert send(app, {"args": {"n": 1}}, queue=queue).get(timeout=30)["status_code"] == 200
    finally:
        app.close()
        worker.stop(timeout=30)
    assert "Traceback" not in worker.output and "forwarder ready: pool=gevent" in worker.output
