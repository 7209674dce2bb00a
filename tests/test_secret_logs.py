"""The secret filters, in process: known secret values masked in any record, and refused messages' contents
hidden even when Celery's log formats are not the ones the filter knows (it fails closed)."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery.worker.consumer import consumer as celery_consumer

from forwarder.extensions.secret_logs import (
    HIDDEN,
    HideRefusedMessageContents,
    MaskKnownSecrets,
    mask_on_handlers,
    secret_values,
)
from forwarder.extensions.task_log import JsonFormatter
from forwarder.settings import Settings

BROKER_PASSWORD = "broker-pw/with+odd=chars-7f1c"
BACKEND_PASSWORD = "backend-pw-0b9e"
CALLBACK_PASSWORD = "default-callback-pw-55aa"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"signing-key-for-callbacks-32byte").decode()
AWS_KEY_ID = "AKIAEXAMPLEKEYID0001"
AWS_SECRET = "aws-secret-access-key-0123456789abcdef"
#: A producer's own callback password: in a task's body, never in the settings.
REQUEST_PASSWORD = "request-callback-pw-c0ffee"
ENV = {
    "CELERY_BROKER_URL": f"redis://:{BROKER_PASSWORD.replace('/', '%2F').replace('+', '%2B').replace('=', '%3D')}"
                         "@127.0.0.1:6379/0",
    "CELERY_RESULT_BACKEND": f"redis://user:{BACKEND_PASSWORD}@127.0.0.1:6379/1",
    "FORWARDER_CALLBACK_AUTH_USERNAME": "endpoint-user",
    "FORWARDER_CALLBACK_AUTH_PASSWORD": CALLBACK_PASSWORD,
    "FORWARDER_CALLBACK_SIGNING_SECRET": SIGNING_SECRET,
}
AWS_ENV = {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "PATH": "/usr/bin"}
SETTINGS_SECRETS = [BROKER_PASSWORD, BACKEND_PASSWORD, CALLBACK_PASSWORD, SIGNING_SECRET, AWS_KEY_ID, AWS_SECRET]


def body_with_password() -> bytes:
    """A refused message's body as Celery dumps it: the request with its callback_auth."""
    request = {"args": {"x": 1}, "callback_auth": {"kind": "basic", "username": "u", "password": REQUEST_PASSWORD}}
    return json.dumps([[request, 1.0], {}, {}]).encode()


def headers_with_password() -> dict[str, Any]:
    return {"id": "t-1", "task": "some.other.task", "argsrepr": f"({{'password': '{REQUEST_PASSWORD}'}},)"}


@pytest.fixture
def log(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """Celery's consumer logger writing to a buffer (text or JSON) through a handler with the mask, as in
    the worker."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if getattr(request, "param", "text") == "json" else logging.Formatter(
        "%(levelname)s %(message)s"))
    logger = logging.getLogger(celery_consumer.__name__)
    saved = (logger.handlers[:], logger.filters[:], logger.propagate, logger.level)
    logger.handlers, logger.filters, logger.propagate = [handler], [], False
    logger.setLevel(logging.DEBUG)
    logger.addFilter(HideRefusedMessageContents())
    mask_on_handlers(MaskKnownSecrets(secret_values(Settings.from_env(ENV), AWS_ENV)), logger)
    yield logger, stream
    logger.handlers, logger.filters, logger.propagate, logger.level = saved


def assert_none_of(output: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in output, f"{secret!r} logged:\n{output}"


def test_a_password_in_any_url_setting_is_a_known_secret():
    settings = Settings.from_env({**ENV, "FORWARDER_HEALTHCHECK_URL": "http://probe:model-url-pw-31@127.0.0.1:5005/readyz"})
    assert "model-url-pw-31" in secret_values(settings, {})


def test_secret_values_cover_urls_callback_auth_signing_and_aws_keys():
    values = secret_values(Settings.from_env(ENV), AWS_ENV)
    for secret in SETTINGS_SECRETS:
        assert secret in values
    assert base64.b64encode(f"endpoint-user:{CALLBACK_PASSWORD}".encode()).decode() in values
    assert "broker-pw%2Fwith%2Bodd%3Dchars-7f1c" in values  # as written in the URL
    assert SIGNING_SECRET.removeprefix("whsec_") in values and "/usr/bin" not in values


@pytest.mark.parametrize("log", ["text", "json"], indirect=True)
def test_known_secrets_are_masked_in_messages_tracebacks_and_fields(log):
    logger, stream = log
    logger.warning("connecting to %s", ENV["CELERY_BROKER_URL"])
    logger.warning("aws %s / %s", AWS_KEY_ID, AWS_SECRET)
    logger.info("fields", extra={"forwarder_fields": {"auth": CALLBACK_PASSWORD, "nested": [SIGNING_SECRET]}})
    try:
        raise RuntimeError(f"backend said no to {BACKEND_PASSWORD}")
    except RuntimeError:
        logger.exception("store failed")
    output = stream.getvalue()
    assert_none_of(output, [*SETTINGS_SECRETS, "broker-pw%2Fwith%2Bodd%3Dchars-7f1c"])
    assert "***" in output and "store failed" in output and "RuntimeError" in output


def test_a_known_refusal_keeps_its_reason_and_task_and_hides_the_body(log):
    logger, stream = log
    logger.error(celery_consumer.UNKNOWN_TASK_ERROR, KeyError("some.other.task"), body_with_password(),
                 headers_with_password(), {"routing_key": "q"})
    output = stream.getvalue()
    assert_none_of(output, [REQUEST_PASSWORD])
    assert "some.other.task" in output and "'id': 't-1'" in output and HIDDEN in output


def test_an_unrecognised_consumer_format_fails_closed(log, monkeypatch):
    """Celery changed its formats: the filter no longer knows the line, and still hides body and headers."""
    logger, stream = log
    changed = "Unregistered task %s (%s).\nbody: %s\nheaders: %s\ndelivery: %s"
    monkeypatch.setattr(celery_consumer, "UNKNOWN_TASK_ERROR", changed)
    logger.error(changed, "some.other.task", KeyError("x"), body_with_password(), headers_with_password(),
                 {"routing_key": "q"})
    logger.error("A brand new line: %s", body_with_password().decode())
    logger.error("Another: %s; %s", f"password={CALLBACK_PASSWORD}", f"creds {AWS_SECRET}")
    output = stream.getvalue()
    assert_none_of(output, [REQUEST_PASSWORD, CALLBACK_PASSWORD, AWS_SECRET])
    assert "Unregistered task some.other.task" in output and "A brand new line" in output


def test_a_changed_constant_with_the_old_shape_is_still_redacted_precisely(log, monkeypatch):
    """Same identity and placeholder count: the known redaction (reason kept, body hidden)."""
    logger, stream = log
    changed = "Unknown task %s! body=%s headers=%s info=%s"
    monkeypatch.setattr(celery_consumer, "UNKNOWN_TASK_ERROR", changed)
    logger.error(changed, KeyError("some.other.task"), body_with_password(), headers_with_password(), {})
    output = stream.getvalue()
    assert_none_of(output, [REQUEST_PASSWORD])
    assert "'task': 'some.other.task'" in output


def test_ordinary_consumer_lines_are_left_alone(log):
    logger, stream = log
    logger.info("Connected to %s", "redis://:**@127.0.0.1:6379/0")
    logger.warning("consumer: Connection to broker lost. Trying to re-establish the connection... %s", 3)
    assert "Connected to redis://:**@127.0.0.1:6379/0" in stream.getvalue()
    assert "re-establish the connection... 3" in stream.getvalue()
