"""deploy/datadog/: the dashboard and monitors name only metrics the worker sends, with tags it sets.

A metric from one of Datadog's own integrations (the queue's depth, which the worker cannot see) is allowed
only from ``INTEGRATIONS``, each with the integration that sends it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from forwarder.extensions import metrics

DATADOG = Path(__file__).resolve().parent.parent / "deploy" / "datadog"
#: Tags on every metric: DogStatsD's global tags (DD_ENV, DD_SERVICE, DD_VERSION, the endpoint's identity) and
#: the agent's own host tag.
GLOBAL_TAGS = {"env", "service", "version", "endpoint_id", "endpoint_name", "host"}
#: The worker's own metrics' tags (forwarder/extensions/metrics.py), beyond the global ones.
BASE = {"queue", "pool"}
TASK = BASE | {"task_name"}
TAGS: dict[str, set[str]] = {
    metrics.SUCCEEDED: TASK, metrics.FAILED: TASK | {"exc_type"}, metrics.RETRIED: TASK, metrics.REFUSED: TASK,
    metrics.HANDED_BACK: TASK, metrics.END_TO_END: TASK | {"outcome"}, metrics.MODEL_RESPONSES: TASK | {"status_code"},
    metrics.MODEL_LATENCY: TASK | {"status_code"}, metrics.HOOK_FAILED: BASE | {"hook", "error_type"},
    metrics.HOOK_SKIPPED: BASE | {"hook"}, metrics.IN_FLIGHT: BASE, metrics.CONCURRENCY: BASE,
    metrics.SATURATION: BASE, metrics.RSS: BASE | {"process"}, metrics.FIREHOSE_BUILT: BASE,
    metrics.FIREHOSE_STS_FAILED: BASE | {"error_type"}, metrics.FIREHOSE_BUILD_FAILED: BASE | {"error_type"},
    metrics.RESTORED: BASE, metrics.EXPIRED: TASK, metrics.MODEL_AVAILABLE: BASE, metrics.MODEL_WAITING: BASE,
    metrics.MODEL_OUTAGES: BASE, metrics.MODEL_OUTAGE_SECONDS: BASE, metrics.RECEIVED: {"queue_name"}, metrics.STUCK: {"queue_name"},
    **{metrics.HOOK.format(hook=hook, event=event): set() for hook in ("callback", "logging")
       for event in ("attempt", "success")},
}
#: Sent by Datadog's integrations, not by the worker: the queue's own depth.
INTEGRATIONS = {
    "aws.sqs.approximate_age_of_oldest_message": ("AWS SQS integration", {"queuename"}),
    "redis.key.length": ("Redis integration (keys: launch-endpoint-id-*)", {"key"}),
}
QUERY = re.compile(r"(?:^|[\s(:,/*+-])(?:sum|avg|max|min|p50|p75|p90|p95|p99|count):([a-z_][\w.]*)\{([^}]*)\}"
                   r"(?:\s+by\s+\{([^}]*)\})?")


def queries() -> list[tuple[str, str]]:
    """(where, query) for every query of the dashboard and the monitors."""
    found = []
    dashboard = json.loads((DATADOG / "dashboard.json").read_text())
    for widget in dashboard["widgets"]:
        for request in widget["definition"].get("requests", []):
            found.append((widget["definition"]["title"], request["q"]))
    for monitor in json.loads((DATADOG / "monitors.json").read_text()):
        found.append((monitor["name"], monitor["query"]))
    return found


def uses(query: str) -> list[tuple[str, set[str]]]:
    """(metric, tags it filters or groups by) for each metric in ``query``."""
    found = []
    for metric, scope, by in QUERY.findall(query):
        tags = {part.strip().split(":", 1)[0].lstrip("$!") for part in scope.split(",") if part.strip() not in ("*", "")}
        tags |= {part.strip() for part in by.split(",") if part.strip()}
        found.append((metric, tags))
    return found


def test_the_code_sends_every_metric_of_the_table():
    sent = {value for name, value in vars(metrics).items() if name.isupper() and isinstance(value, str)
            and value.startswith(("forwarder.", "scale_launch.")) and "{" not in value and value != metrics.PREFIX}
    assert sent <= set(TAGS), sorted(sent - set(TAGS))


def test_every_query_parses_and_names_a_metric():
    for where, query in queries():
        assert uses(query), f"{where}: no metric found in {query!r}"


@pytest.mark.parametrize(("where", "query"), queries())
def test_each_metric_is_one_the_worker_sends_with_its_tags(where: str, query: str):
    for metric, tags in uses(query):
        if metric in INTEGRATIONS:
            known = INTEGRATIONS[metric][1]
        else:
            assert metric in TAGS, f"{where}: {metric} is not a metric the worker sends (forwarder/extensions/metrics.py)"
            known = TAGS[metric]
        # $queue is the dashboard's variable on the `queue` tag; $queue_name on llm-engine's `queue_name`
        assert tags <= known | GLOBAL_TAGS, f"{where}: {metric} has no tag {sorted(tags - known - GLOBAL_TAGS)}"


def test_the_dashboard_covers_what_an_operator_needs():
    text = (DATADOG / "dashboard.json").read_text()
    for metric in (metrics.SUCCEEDED, metrics.FAILED, metrics.MODEL_LATENCY, metrics.END_TO_END, metrics.IN_FLIGHT,
                   metrics.SATURATION, metrics.HOOK_FAILED, metrics.RESTORED):
        assert metric in text, metric
    assert "by {exc_type}" in text and f"p50:{metrics.MODEL_LATENCY}" in text and f"p99:{metrics.MODEL_LATENCY}" in text
    dashboard: dict[str, Any] = json.loads(text)
    assert dashboard["layout_type"] == "ordered" and {"queue", "env"} <= {v["name"] for v in dashboard["template_variables"]}


def test_the_monitors_alert_on_failures_stuck_tasks_and_an_undrained_queue():
    monitors = json.loads((DATADOG / "monitors.json").read_text())
    by_metric = {metric for monitor in monitors for metric, _ in uses(monitor["query"])}
    assert {metrics.FAILED, metrics.SUCCEEDED, metrics.STUCK, metrics.CONCURRENCY} <= by_metric
    assert {"aws.sqs.approximate_age_of_oldest_message", "redis.key.length"} <= by_metric
    for monitor in monitors:
        assert monitor["type"] in ("query alert", "metric alert") and monitor["message"] and monitor["options"]["thresholds"]
        threshold = monitor["options"]["thresholds"]["critical"]
        assert re.search(rf"[<>]=?\s*{re.escape(str(threshold))}$", monitor["query"]), monitor["query"]
