"""The summary line (``forwarder.extensions.summary``): counts over the interval, in flight, model p50/p99,
across prefork children (shared memory) and gevent, in text and JSON."""

from __future__ import annotations

import json
import multiprocessing
import re

import pytest

from devtools.demo import send
from devtools.servers import wait_for
from forwarder.extensions.summary import SAMPLES, SUMMARY_LINE, Tally, percentile
from forwarder.settings import Settings

POOLS = ["prefork", "gevent"]


def test_percentiles_are_nearest_rank():
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0 and percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_the_tally_is_shared_with_forked_children_and_taken_per_interval():
    tally = Tally()

    def child(n: int) -> None:
        for _ in range(n):
            tally.add(0, 0.010)  # done, with a 10 ms model call
        tally.add(1, None)  # failed before any call
        tally.add(2, 0.5)  # a retry after a 500 ms call

    processes = [multiprocessing.get_context("fork").Process(target=child, args=(10,)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(10)
    counts, latencies = tally.take()
    assert counts == [30, 3, 3, 33]
    assert sorted(latencies) == [0.010] * 30 + [0.5] * 3
    assert tally.take() == ([0, 0, 0, 0], [])  # the next interval starts empty
    for _ in range(SAMPLES + 5):
        tally.add(None, 1.0)
    counts, latencies = tally.take()
    assert counts[3] == SAMPLES + 5 and len(latencies) == SAMPLES  # the last SAMPLES calls


def test_the_interval_is_a_variable_default_60_and_0_turns_it_off():
    assert Settings.from_env({}).summary_interval == 60
    assert Settings.from_env({"FORWARDER_SUMMARY_INTERVAL": "0"}).summary_interval == 0


def summaries(output: str, json_format: bool) -> list[dict[str, object]]:
    found = []
    for line in output.splitlines():
        if SUMMARY_LINE not in line:
            continue
        if json_format:
            record = json.loads(line)
            assert record["message"] == SUMMARY_LINE and record["level"] == "INFO"
            found.append(record)
        else:
            fields = dict(re.findall(r"(\w+)=(\S+)", line.split(f"{SUMMARY_LINE}: ", 1)[1]))
            found.append({key: (None if value == "-" else float(value)) for key, value in fields.items()})
    return found


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_summary_counts_every_outcome_of_the_interval(pool, log_format, start_worker, producer, model, queue):
    model.behaviour.delay = 0.05
    model.behaviour.mode_by_id["garbage"] = "text"  # a body that is not JSON: the task fails
    worker = start_worker(pool, FORWARDER_SUMMARY_INTERVAL="1", FORWARDER_LOG_FORMAT=log_format)
    results = [send(producer, {"args": {"id": n}}, queue=queue) for n in range(5)]
    failed = send(producer, {"args": {"id": "garbage"}}, queue=queue)
    assert [r.get(timeout=30)["status_code"] for r in results] == [200] * 5
    with pytest.raises(Exception):  # noqa: B017  (the model's answer is not JSON)
        failed.get(timeout=30)

    def totals() -> dict[str, float]:
        lines = summaries(worker.output, log_format == "json")
        return {key: sum(float(line[key] or 0) for line in lines) for key in ("done", "failed", "model_calls")}

    expected = {"done": 5, "failed": 1, "model_calls": 6}
    wait_for(lambda: totals() == expected, 15, f"summary lines adding up to {expected}")
    lines = summaries(worker.output, log_format == "json")
    busy = [line for line in lines if line["model_calls"]]
    assert busy and all(50 <= float(line["model_p50_ms"]) <= float(line["model_p99_ms"]) < 5000 for line in busy)
    assert all(line["in_flight"] is not None and line["retried"] == 0 for line in lines)
    assert all(0.5 < float(line["interval_s"]) < 5 for line in lines[1:])
    idle = [line for line in lines if not line["model_calls"]]
    assert all(line["model_p50_ms"] is None for line in idle)


def test_no_summary_line_when_the_interval_is_0(start_worker, producer, model, queue):
    worker = start_worker("prefork", FORWARDER_SUMMARY_INTERVAL="0")
    assert send(producer, {"args": {"id": 1}}, queue=queue).get(timeout=30)["status_code"] == 200
    worker.wait_for_log("task finished", timeout=10)
    assert SUMMARY_LINE not in worker.output
