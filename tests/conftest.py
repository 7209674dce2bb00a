"""Shared fixtures: real servers started by the suite itself on free 127.0.0.1 ports.

Fixture modules live in tests/support/ (one per kind of server); they are imported here so every test
module sees them. A test that uses a real server or a worker is marked ``integration``; the rest run in
seconds on their own: ``make test-fast`` (``pytest -m "not integration"``). A run leaves nothing in the
temporary folder: workers remove their own folder (``devtools.servers.WorkerProcess``), ``tmp_path`` is
removed after each test, and the file ddtrace's pytest plugin creates at start is removed at the end.
"""

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.aws import *  # noqa: F403
from tests.support.callback import *  # noqa: F403
from tests.support.dogstatsd import *  # noqa: F403
from tests.support.faulty_proxy import *  # noqa: F403
from tests.support.servers import *  # noqa: F403
from tests.support.trace_agent import *  # noqa: F403

#: Fixtures that start a real server (Redis, moto, a model or fault proxy, a trace agent) or a worker.
SERVER_FIXTURES = frozenset({
    "redis_server", "model_server", "model", "producer", "start_worker", "moto_server", "aws_env",
    "firehose_stream", "sqs_queue", "s3_bucket", "spawn", "results", "broker", "own_model", "model_process",
    "model_on", "faulty_proxy", "trace_agent",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVER_FIXTURES or item.get_closest_marker("faults"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A folder of the test's own, removed after it (pytest's own keeps the last three runs' folders)."""
    with tempfile.TemporaryDirectory(prefix="forwarder-test-") as path:
        yield Path(path)


def pytest_unconfigure(config: pytest.Config) -> None:
    # ddtrace's pytest plugin (loaded before this file) imports ddtrace's config, which creates an empty
    # shared file (its remote-config "extra services" queue) in the temporary folder and never removes it.
    ddtrace = sys.modules.get("ddtrace")
    queue = getattr(getattr(ddtrace, "config", None), "_extra_services_queue", None)
    filename = getattr(queue, "filename", None)
    if isinstance(filename, str):
        Path(filename).unlink(missing_ok=True)
