"""Fixtures for AWS on this machine: moto's server (STS, SQS, S3, Firehose) on a free 127.0.0.1 port.

boto3 reaches it through AWS_ENDPOINT_URL, so workers launched as subprocesses need only ``aws_env``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import boto3
import pytest
import requests

from devtools.servers import free_port, wait_for
from gateways.firehose import FirehoseGateway

__all__ = ["moto_server", "aws_env", "aws_client", "firehose_stream", "sqs_queue", "s3_bucket",
           "delivered_records", "wait_for_records", "assume_role_calls", "unique_role_arn", "reset_moto"]

REGION = "us-east-1"
#: Dummy credentials: moto accepts any, and nothing can reach real AWS with them.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def aws_env(moto_server: str) -> dict[str, str]:
    """Environment that points every boto3 client (in this process and in workers) at moto."""
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": moto_server, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def aws_client(service: str, moto_url: str) -> Any:
    """A boto3 client for ``service`` against moto."""
    return boto3.session.Session().client(
        service, region_name=REGION, endpoint_url=moto_url,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def reset_moto(moto_url: str) -> None:
    """Forget every resource moto holds (between tests that count calls)."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()


@pytest.fixture
def s3_bucket(moto_server: str, aws_env: dict[str, str]) -> str:
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    aws_client("s3", moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def firehose_stream(moto_server: str, aws_env: dict[str, str], s3_bucket: str) -> dict[str, str]:
    """A Firehose stream delivering each put as one S3 object under ``prefix`` in ``bucket``."""
    name = f"stream-{uuid.uuid4().hex[:12]}"
    prefix = f"{name}/"
    aws_client("firehose", moto_server).create_delivery_stream(
        DeliveryStreamName=name,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": f"arn:aws:s3:::{s3_bucket}",
            "Prefix": prefix,
        },
    )
    return {"name": name, "bucket": s3_bucket, "prefix": prefix}


@pytest.fixture
def sqs_queue(moto_server: str, aws_env: dict[str, str]) -> dict[str, str]:
    """An SQS queue (short visibility timeout, for redelivery tests) and its URL."""
    name = f"queue-{uuid.uuid4().hex[:12]}"
    url = aws_client("sqs", moto_server).create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    return {"name": name, "url": url}


def delivered_records(moto_url: str, stream: dict[str, str]) -> list[dict[str, Any]]:
    """Every record delivered by ``stream`` so far: objects split on newlines, each parsed as JSON."""
    s3 = aws_client("s3", moto_url)
    records: list[dict[str, Any]] = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=stream["bucket"], Prefix=stream["prefix"]):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=stream["bucket"], Key=item["Key"])["Body"].read().decode()
            records.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return records


def wait_for_records(moto_url: str, stream: dict[str, str], count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Every record of ``stream`` once at least ``count`` were delivered; TimeoutError after ``timeout``."""

    def enough() -> list[dict[str, Any]] | None:
        found = delivered_records(moto_url, stream)
        return found if len(found) >= count else None

    return wait_for(enough, timeout, f"{count} firehose records")


def assume_role_calls(moto_url: str, role_arn: str) -> int:
    """How many AssumeRole calls for ``role_arn`` moto's STS has answered (its own state, not a mock).

    Use a role ARN unique to the test: moto's state is shared by the whole session.
    """
    data = requests.get(f"{moto_url}/moto-api/data.json", timeout=10).json()
    roles = data.get("sts", {}).get("AssumedRole", [])
    return sum(1 for role in roles if role.get("role_arn") == role_arn)


def unique_role_arn() -> str:
    """A role ARN no other test uses, so assume-role calls can be counted per test."""
    return f"arn:aws:iam::123456789012:role/forwarder-{uuid.uuid4().hex[:10]}"


def make_gateway(stream_name: str, role_arn: str = "", **overrides: Any) -> FirehoseGateway:
    """A Firehose gateway with the worker's default session, leeway and pool (tests state their own)."""
    options: dict[str, Any] = {
        "role_arn": role_arn, "session_duration": 3600, "leeway": timedelta(seconds=600), "max_pool_connections": 10,
    }
    return FirehoseGateway(stream_name, **{**options, **overrides})
