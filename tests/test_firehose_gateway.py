"""FirehoseGateway against moto's real server: delivery, one assume-role per credential lifetime, failures.

Assume-role calls are counted from moto's own STS state, per test through a role ARN of its own.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from devtools.servers import free_port
from forwarder import deps
from forwarder.settings import Settings
from gateways.firehose import (
    CLIENT_BUILT,
    MAX_RECORD_BYTES,
    STS_FAILED,
    FirehosePutError,
    FirehoseRecordTooLarge,
    FirehoseUnavailable,
    build_firehose_client,
    encode_record,
)
from tests.support.aws import assume_role_calls, aws_client, delivered_records, make_gateway, unique_role_arn


class JumpClock:
    """Real UTC time plus an offset the test moves forward (STS expiries stay real)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def raw_objects(moto_url: str, stream: dict[str, str]) -> list[bytes]:
    s3 = aws_client("s3", moto_url)
    listing = s3.list_objects_v2(Bucket=stream["bucket"], Prefix=stream["prefix"]).get("Contents", [])
    return [s3.get_object(Bucket=stream["bucket"], Key=item["Key"])["Body"].read() for item in listing]


def all_assume_role_calls(moto_url: str) -> int:
    data = requests.get(f"{moto_url}/moto-api/data.json", timeout=10).json()
    return len(data.get("sts", {}).get("AssumedRole", []))


def test_put_delivers_newline_terminated_json_records(moto_server: str, firehose_stream: dict[str, Any]) -> None:
    gateway = make_gateway(firehose_stream["name"], role_arn=unique_role_arn())
    sent = [{"n": index, "text": 'quote " and newline \n inside', "nested": {"ok": True}} for index in range(3)]
    for record in sent:
        gateway.put_record(record)
    bodies = raw_objects(moto_server, firehose_stream)
    assert len(bodies) == 3
    for body in bodies:
        assert body.endswith(b"\n") and body.count(b"\n") == 1  # one record per line, even when concatenated
    assert sorted((json.loads(body) for body in bodies), key=lambda r: r["n"]) == sent
    gateway.close()


def test_assume_role_is_called_once_for_100_puts(moto_server: str, firehose_stream: dict[str, Any]) -> None:
    role = unique_role_arn()
    gateway = make_gateway(firehose_stream["name"], role_arn=role)
    for index in range(100):
        gateway.put_record({"n": index})
    assert assume_role_calls(moto_server, role) == 1
    assert gateway.client_cache.builds == 1
    assert sorted(record["n"] for record in delivered_records(moto_server, firehose_stream)) == list(range(100))


def test_client_is_rebuilt_once_near_expiry(moto_server: str, firehose_stream: dict[str, Any]) -> None:
    role = unique_role_arn()
    clock = JumpClock()
    gateway = make_gateway(firehose_stream["name"], role_arn=role, clock=clock)
    gateway.put_record({"n": 1})
    first = gateway.client_cache.get()
    clock.offset = timedelta(seconds=2900)  # 11+ minutes left: still fresh
    gateway.put_record({"n": 2})
    assert assume_role_calls(moto_server, role) == 1
    clock.offset = timedelta(seconds=3600 - 600 + 30)  # inside the 10 minute leeway, before expiry
    for index in range(3, 13):
        gateway.put_record({"n": index})
    assert assume_role_calls(moto_server, role) == 2
    assert gateway.client_cache.builds == 2 and gateway.client_cache.get() is not first
    assert len(delivered_records(moto_server, firehose_stream)) == 12


def test_without_a_role_no_assume_role_is_made(moto_server: str, firehose_stream: dict[str, Any]) -> None:
    before = all_assume_role_calls(moto_server)
    gateway = make_gateway(firehose_stream["name"])
    for index in range(5):
        gateway.put_record({"n": index})
    assert all_assume_role_calls(moto_server) == before
    assert gateway.client_cache.builds == 1
    assert len(delivered_records(moto_server, firehose_stream)) == 5


def test_build_is_pure_and_uses_the_assumed_role(moto_server: str, aws_env: dict[str, str]) -> None:
    role = unique_role_arn()
    client, expiry = build_firehose_client(role, 900, 7)
    assert expiry is not None and expiry.tzinfo is not None
    assert timedelta(seconds=800) < expiry - datetime.now(UTC) <= timedelta(seconds=901)
    credentials = client._request_signer._credentials  # read-only check of what the client signs with
    assert credentials.access_key.startswith("ASIA") and credentials.token
    assert client.meta.config.max_pool_connections == 7
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert client.meta.config.connect_timeout and client.meta.config.read_timeout
    assert assume_role_calls(moto_server, role) == 1
    client.close()


def test_oversize_record_is_refused_before_any_call(moto_server: str, firehose_stream: dict[str, Any]) -> None:
    gateway = make_gateway(firehose_stream["name"], role_arn=unique_role_arn())
    record = {"blob": "x" * MAX_RECORD_BYTES}
    assert len(encode_record(record)) > MAX_RECORD_BYTES
    with pytest.raises(FirehoseRecordTooLarge, match="exceeds"):
        gateway.put_record(record)
    assert gateway.client_cache.builds == 0  # refused locally: no STS, no put
    gateway.put_record({"blob": "x" * (MAX_RECORD_BYTES - 100)})  # just under the limit goes through
    assert len(raw_objects(moto_server, firehose_stream)) == 1


def test_firehose_error_raises_a_typed_error(moto_server: str, aws_env: dict[str, str]) -> None:
    gateway = make_gateway("no-such-stream", role_arn=unique_role_arn())
    with pytest.raises(FirehosePutError, match="ResourceNotFoundException"):
        gateway.put_record({"n": 1})


def test_sts_failure_raises_typed_errors_then_recovers(
    moto_server: str, firehose_stream: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    role = unique_role_arn()
    clock = JumpClock()
    gateway = make_gateway(firehose_stream["name"], role_arn=role, clock=clock)
    # botocore honours AWS_ENDPOINT_URL_STS: STS now answers from a closed port (connection refused).
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(FirehoseUnavailable, match="EndpointConnectionError"):
        gateway.put_record({"n": 1})
    with pytest.raises(FirehoseUnavailable, match="last build failed"):  # backing off: STS is not called
        gateway.put_record({"n": 2})
    monkeypatch.delenv("AWS_ENDPOINT_URL_STS")
    with pytest.raises(FirehoseUnavailable):  # STS is back, but the 1 s backoff has not elapsed
        gateway.put_record({"n": 3})
    clock.offset = timedelta(seconds=2)
    gateway.put_record({"n": 4})
    assert assume_role_calls(moto_server, role) == 1  # the failed attempts never reached moto
    assert [record["n"] for record in delivered_records(moto_server, firehose_stream)] == [4]


def test_unreachable_firehose_raises_a_typed_error(
    moto_server: str, firehose_stream: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_FIREHOSE", f"http://127.0.0.1:{free_port()}")
    gateway = make_gateway(firehose_stream["name"])
    with pytest.raises(FirehosePutError, match="EndpointConnectionError") as caught:
        gateway.put_record({"n": 1})
    assert not isinstance(caught.value, FirehoseUnavailable)  # the client exists; the put failed


def test_deps_build_the_gateway_from_the_firehose_settings() -> None:
    settings = Settings.from_env({
        "FORWARDER_HOOKS": "logging",
        "FIREHOSE_STREAM_NAME": "the-stream",
        "FIREHOSE_ROLE_ARN": "arn:aws:iam::123456789012:role/logger",
        "FIREHOSE_SESSION_DURATION": "1800",
        "FIREHOSE_REFRESH_LEEWAY": "120",
        "CELERY_WORKER_CONCURRENCY": "32",
    })
    gateway = deps.firehose_gateway(settings)
    assert gateway.stream_name == "the-stream" and gateway.role_arn == settings.firehose_role_arn
    assert gateway.client_cache._leeway == timedelta(seconds=120)
    assert gateway.client_cache.builds == 0  # nothing built until the first put


def test_the_observer_hears_one_build_and_each_sts_failure(
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[tuple[str, str]] = []
    gateway = make_gateway(firehose_stream["name"], unique_role_arn())
    gateway.observe(lambda event, error_type: heard.append((event, error_type)))
    for index in range(3):
        gateway.put_record({"n": index})
    assert heard == [(CLIENT_BUILT, "")]  # one build for three puts

    # STS unreachable: the failed AssumeRole is heard as such, with the error's class name
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")
    down = make_gateway(firehose_stream["name"], unique_role_arn())
    down.observe(lambda event, error_type: heard.append((event, error_type)))
    down.observe(lambda event, error_type: 1 / 0)  # a broken observer changes nothing
    with pytest.raises(FirehoseUnavailable, match="EndpointConnectionError"):
        down.put_record({"n": 0})
    with pytest.raises(FirehoseUnavailable, match="last build failed"):
        down.put_record({"n": 1})  # backing off: no second attempt, nothing heard
    assert heard == [(CLIENT_BUILT, ""), (STS_FAILED, "EndpointConnectionError")]
