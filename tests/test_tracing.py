"""Our own spans under ddtrace-run, nested in the task's trace, and a producer's trace continued by the worker.

Run as production runs it (``ddtrace-run``, tracing on) against the suite's fake local trace agent.
"""

from __future__ import annotations

import json

import pytest

from devtools.demo import send

POOLS = ["prefork", "gevent"]
TRACE_ID, PARENT_ID = 7316284659213485123, 4242424242424242


@pytest.mark.parametrize("pool", POOLS)
def test_steps_are_spans_of_the_task_and_a_producers_trace_is_continued(
    pool, start_worker, producer, model, queue, trace_agent, callback_receiver
):
    password = "span-scan-password-77"
    start_worker(pool, ddtrace=True, timeout=90, FORWARDER_HOOKS="callback",
                 FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1", **trace_agent.env())
    request = {"args": {"id": 1}, "callback_url": f"{callback_receiver.url}/cb",
               "callback_auth": {"kind": "basic", "username": "caller", "password": password}}
    # As a producer traced by ddtrace sends it: Datadog propagation headers under the message's "headers".
    context = {"x-datadog-trace-id": str(TRACE_ID), "x-datadog-parent-id": str(PARENT_ID),
               "x-datadog-sampling-priority": "1"}
    result = send(producer, request, queue=queue, headers={"headers": context})
    assert result.get(timeout=30)["status_code"] == 200
    callback_receiver.wait_for(1)

    def complete(spans: list[dict]) -> bool:
        names = {s["name"] for s in spans if s["trace_id"] == TRACE_ID}
        return {"celery.run", "forwarder.plan", "forwarder.model", "forwarder.hook", "requests.request"} <= names

    spans = [s for s in trace_agent.wait_for_spans(complete, 30, "the task's spans in the producer's trace")
             if s["trace_id"] == TRACE_ID]
    by_name = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (run,) = by_name["celery.run"]
    assert run["parent_id"] == PARENT_ID and run["meta"]["celery.id"] == result.id  # the producer's trace, continued
    (plan,), (model_call,), (hook,) = by_name["forwarder.plan"], by_name["forwarder.model"], by_name["forwarder.hook"]
    for span in (plan, model_call, hook):
        assert span["parent_id"] == run["span_id"] and span["meta"]["celery.id"] == result.id
    assert model_call["meta"]["http.status_code"] == "200" or model_call["metrics"].get("http.status_code") == 200
    assert model_call["metrics"]["forwarder.model.answer_bytes"] > 0
    posts = [s for s in by_name["requests.request"] if s["meta"].get("http.url") == f"{model.url}/predict"]
    assert posts and posts[0]["parent_id"] == model_call["span_id"]  # the HTTP call inside our step
    assert hook["resource"] == "callback" and hook["meta"]["forwarder.hook.outcome"] == "success"
    assert password not in json.dumps(trace_agent.spans, default=str)  # no secret on any span
