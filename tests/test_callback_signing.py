"""Signed callbacks (Standard Webhooks), checked with the reference library's own verifier.

``standardwebhooks.Webhook(secret).verify(body, headers)`` is what a receiver runs: every signed callback
must pass it under each configured secret, and a changed body, id or timestamp must fail it. Unit tests
drive the signer and ``CallbackClient`` in this process against a real HTTP receiver; the end-to-end
tests run the worker (both pools).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from devtools.demo import send
from devtools.servers import worker_env
from forwarder import deps
from forwarder.errors import ConfigError
from forwarder.hooks import HookRunner
from forwarder.settings import Settings, effective_config
from gateways.callback import CallbackClient, CallbackError
from gateways.webhook_signing import WebhookSigner, normalize_secrets, parse_secrets, sign
from tests.support.faults import assert_no_secret

# Two secrets, as during a rotation (each a 32-byte key); the first is the spec's own example form.
OLD = "whsec_" + base64.b64encode(b"old-key-for-callbacks-32-bytes!!").decode()
NEW = "whsec_" + base64.b64encode(b"new-key-for-callbacks-32-bytes!!").decode()
OTHER = "whsec_" + base64.b64encode(b"a-key-nobody-configured-32bytes!").decode()
POOLS = ["prefork", "gevent"]


def verify(secret: str, raw: bytes, headers: dict[str, str]) -> object:
    """The receiver's check, by the reference library (raises WebhookVerificationError)."""
    return Webhook(secret).verify(raw, headers)


# ------------------------------------------------------------------------------------ the signer


def test_signatures_verify_with_the_reference_library_under_each_secret():
    body = b'{"result":"{\\"y\\": 1}","status_code":200,"task_id":"4f1c-task"}'
    headers = WebhookSigner(parse_secrets(f"{OLD} {NEW}")).headers("4f1c-task", body)
    assert headers["webhook-id"] == "4f1c-task"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(sig.startswith("v1,") for sig in headers["webhook-signature"].split(" "))
    for secret in (OLD, NEW):
        assert verify(secret, body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        verify(OTHER, body, headers)


@pytest.mark.parametrize("change", ["body", "id", "timestamp"])
def test_anything_changed_fails_verification(change):
    body = b'{"task_id":"t-1","result":"ok"}'
    headers = WebhookSigner(parse_secrets(OLD)).headers("t-1", body)
    if change == "body":
        body = body.replace(b"ok", b"OK")
    elif change == "id":
        headers["webhook-id"] = "t-2"
    else:
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verify(OLD, body, headers)


def test_the_signature_is_the_specs_hmac_of_id_timestamp_and_body():
    key = b"k" * 32
    # The spec's signed content is "<id>.<timestamp>.<body>", HMAC-SHA256, base64.
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert sign(key, "msg_1", 1700000000, b"{}") == f"v1,{expected}"


def test_each_call_takes_a_fresh_timestamp():
    ticks = iter([1_700_000_000.9, 1_700_000_003.2])
    signer = WebhookSigner(parse_secrets(OLD), clock=lambda: next(ticks))
    first, second = signer.headers("t", b"{}"), signer.headers("t", b"{}")
    assert (first["webhook-timestamp"], second["webhook-timestamp"]) == ("1700000000", "1700000003")
    assert first["webhook-signature"] != second["webhook-signature"]


@pytest.mark.parametrize("msg_id", ["", "a.b", "a b", "t\r\nX-Evil: 1", "é", "x" * 257])
def test_an_id_that_is_not_header_safe_is_refused(msg_id):
    with pytest.raises(ValueError, match="webhook id"):
        WebhookSigner(parse_secrets(OLD)).headers(msg_id, b"{}")


def test_secrets_parse_with_or_without_padding_and_any_whitespace():
    unpadded = "whsec_" + base64.b64encode(b"twenty-five-bytes-of-key!").decode().rstrip("=")
    assert parse_secrets(f"  {OLD}\n\t{unpadded} ") == (b"old-key-for-callbacks-32-bytes!!", b"twenty-five-bytes-of-key!")
    assert normalize_secrets(f"  {OLD}\n\t{NEW} ") == f"{OLD} {NEW}"
    assert parse_secrets("") == () and parse_secrets("  ") == () and normalize_secrets(" ") == ""
    assert repr(WebhookSigner(parse_secrets(OLD))) == "WebhookSigner(1 key(s))"  # never the key


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (base64.b64encode(b"x" * 32).decode(), "the secret must be whsec_ followed by base64"),
        ("whsec_not*base64!", "the secret is not valid base64"),
        ("whsec_" + base64.b64encode(b"short key").decode(), "the secret decodes to 9 bytes; at least 24"),
        ("whsec_", "the secret decodes to 0 bytes"),
        (f"{OLD} secret-two", "secret 2 of 2 must be whsec_"),
    ],
)
def test_bad_secrets_are_refused_by_position_never_by_value(raw, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        parse_secrets(raw)
    assert "secret-two" not in str(caught.value) and OLD[6:] not in str(caught.value)


# ----------------------------------------------------------------------------- settings and deps


def test_a_bad_secret_stops_the_settings_naming_the_variable_and_hiding_the_value():
    value = "whsec_" + base64.b64encode(b"too-short").decode()
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"FORWARDER_CALLBACK_SIGNING_SECRET": value})
    assert caught.value.variable == "FORWARDER_CALLBACK_SIGNING_SECRET"
    assert str(caught.value).startswith("FORWARDER_CALLBACK_SIGNING_SECRET='<hidden>' the secret decodes to 9 bytes")
    assert value not in str(caught.value) and value[6:] not in str(caught.value)


def test_the_secret_is_masked_wherever_settings_are_shown():
    settings = Settings.from_env({"FORWARDER_CALLBACK_SIGNING_SECRET": f"{OLD} {NEW}"})
    assert settings.callback_signing_secret == f"{OLD} {NEW}"
    config = effective_config(settings)
    assert config["FORWARDER_CALLBACK_SIGNING_SECRET"] == "***"
    assert_no_secret(json.dumps(config) + repr(settings), [OLD[6:], NEW[6:]])
    assert effective_config(Settings.from_env({}))["FORWARDER_CALLBACK_SIGNING_SECRET"] == ""


def test_check_accepts_a_good_secret_and_stops_on_a_bad_one_without_showing_either():
    def check(secret: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "forwarder", "check"], capture_output=True, text=True, timeout=60,
                              env=worker_env(FORWARDER_CALLBACK_SIGNING_SECRET=secret), stdin=subprocess.DEVNULL)

    good = check(f"{OLD} {NEW}")
    assert good.returncode == 0 and "configuration OK" in good.stdout, good.stderr
    assert_no_secret(good.stdout + good.stderr, [OLD[6:], NEW[6:]])
    short = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    bad = check(f"{OLD} {short}")
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line == ("forwarder: configuration error: FORWARDER_CALLBACK_SIGNING_SECRET='<hidden>' secret 2 of 2 "
                    "decodes to 16 bytes; at least 24 are required")
    assert_no_secret(bad.stdout + bad.stderr, [OLD[6:], short[6:]])


def test_no_secret_means_no_signer():
    assert deps.callback_signer(Settings.from_env({})) is None
    assert deps.callback_hook(Settings.from_env({})).client.signer is None
    assert deps.callback_hook(Settings.from_env({"FORWARDER_CALLBACK_SIGNING_SECRET": OLD})).client.signer is not None


# ------------------------------------------------------------------------ the client, over HTTP


def client(secrets: str | None = OLD, **kwargs: object) -> CallbackClient:
    signer = WebhookSigner(parse_secrets(secrets)) if secrets else None
    return CallbackClient(timeout=2, attempts=3, allowed_hosts=("127.0.0.1",), backoff=0.02, signer=signer, **kwargs)


def test_the_exact_bytes_sent_are_signed_and_verify(callback_receiver):
    body = {"result": '{"text": "caf\u00e9 \u2603"}', "status_code": 200, "task_id": "t-1"}
    client().send(callback_receiver.url, body, ("u", "p"), webhook_id="t-1")
    seen = callback_receiver.wait_for(1)[0]
    assert verify(OLD, seen.raw, seen.headers) == body
    assert seen.headers["webhook-id"] == "t-1" and seen.basic_auth == ("u", "p")


def test_a_retry_has_the_same_id_a_fresh_timestamp_and_verifies(callback_receiver):
    callback_receiver.statuses = [503]
    ticks = iter([1_700_000_000.0, 1_700_000_007.0])
    signer = WebhookSigner(parse_secrets(OLD), clock=lambda: next(ticks))
    sender = CallbackClient(timeout=2, attempts=3, allowed_hosts=("127.0.0.1",), backoff=0.02, signer=signer)
    sender.send(callback_receiver.url, {"task_id": "t-7"}, None, webhook_id="t-7")
    first, second = callback_receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "t-7"
    assert (first.headers["webhook-timestamp"], second.headers["webhook-timestamp"]) == ("1700000000", "1700000007")
    for seen in (first, second):  # the reference verifier's own clock check is ±5 min; the HMAC alone here
        expected = sign(b"old-key-for-callbacks-32-bytes!!", "t-7", int(seen.headers["webhook-timestamp"]), seen.raw)
        assert seen.headers["webhook-signature"] == expected


def test_a_signed_retry_verifies_with_the_reference_library(callback_receiver):
    callback_receiver.statuses = [500]
    client(f"{OLD} {NEW}").send(callback_receiver.url, {"task_id": "t-8"}, None, webhook_id="t-8")
    attempts = callback_receiver.wait_for(2)
    for seen in attempts:
        for secret in (OLD, NEW):
            assert verify(secret, seen.raw, seen.headers) == {"task_id": "t-8"}
        tampered = seen.raw.replace(b"t-8", b"t-9")
        with pytest.raises(WebhookVerificationError):
            verify(OLD, tampered, seen.headers)


def test_without_a_signer_nothing_changes(callback_receiver):
    client(None).send(callback_receiver.url, {"task_id": "t"}, None, webhook_id="t")
    seen = callback_receiver.wait_for(1)[0]
    assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & set(seen.headers)


def test_a_signed_callback_needs_a_valid_id_and_sends_nothing_without_one(callback_receiver):
    with pytest.raises(CallbackError, match="not a valid webhook id"):
        client().send(callback_receiver.url, {"task_id": "t"}, None, webhook_id="bad id")
    with pytest.raises(CallbackError, match="not a valid webhook id"):
        client().send(callback_receiver.url, {"task_id": "t"}, None)
    time.sleep(0.05)
    assert callback_receiver.received == []


def test_the_hook_signs_with_the_task_id_for_success_and_failure(callback_receiver):
    hook = deps.callback_hook(Settings.from_env({
        "FORWARDER_HOOKS": "callback", "FORWARDER_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "FORWARDER_CALLBACK_SIGNING_SECRET": OLD,
    }))
    request = {"callback_url": callback_receiver.url}
    HookRunner([hook]).run(request, {"result": "r", "status_code": 200}, "task-ok")
    HookRunner([hook]).run(request, {"error": "boom", "error_metadata": "trace"}, "task-failed", "FAILURE")
    ok, failed = callback_receiver.wait_for(2)
    assert verify(OLD, ok.raw, ok.headers) == {"result": "r", "status_code": 200, "task_id": "task-ok"}
    assert verify(OLD, failed.raw, failed.headers) == {"task_id": "task-failed", "state": "FAILURE", "error": "boom"}
    assert (ok.headers["webhook-id"], failed.headers["webhook-id"]) == ("task-ok", "task-failed")


def test_the_readme_receiver_snippet_verifies_a_real_callback_and_refuses_a_forged_one(callback_receiver):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("### Signed callbacks", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet.replace('"whsec_..."', repr(NEW)), "README.md", "exec"), namespace)
    client(f"{OLD} {NEW}").send(callback_receiver.url, {"task_id": "t-r", "result": "r"}, None, webhook_id="t-r")
    seen = callback_receiver.wait_for(1)[0]
    headers = {name.title(): value for name, value in seen.headers.items()}  # as a web framework may spell them
    assert namespace["handle"](seen.raw, headers) == {"task_id": "t-r", "result": "r"}
    assert namespace["handle"](seen.raw, headers) is None  # a repeat
    with pytest.raises(PermissionError):
        namespace["handle"](seen.raw.replace(b'"r"}', b'"forged"}'), headers)


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_signed_callbacks_verify_on_the_first_attempt_and_on_a_retry_under_either_secret(
    pool, start_worker, producer, model, queue, callback_receiver
):
    worker = start_worker(
        pool, FORWARDER_HOOKS="callback", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1", FORWARDER_CALLBACK_TIMEOUT="2",
        FORWARDER_CALLBACK_RETRIES="2", FORWARDER_CALLBACK_SIGNING_SECRET=f"{OLD} {NEW}",
    )
    callback_receiver.statuses = [503]  # the first attempt is answered 503: the second is a retry
    task = send(producer, {"args": {"id": 1}, "callback_url": f"{callback_receiver.url}/cb"}, queue=queue)
    value = task.get(timeout=30)
    first, retry = callback_receiver.wait_for(2)
    for seen in (first, retry):
        assert seen.headers["webhook-id"] == task.id  # the same on every attempt: the receiver dedupes on it
        for secret in (OLD, NEW):  # a receiver holding either secret of the rotation verifies
            assert verify(secret, seen.raw, seen.headers) == {**value, "task_id": task.id}
        with pytest.raises(WebhookVerificationError):  # a tampered body
            verify(OLD, seen.raw.replace(b'"status_code":200', b'"status_code":201'), seen.headers)
        with pytest.raises(WebhookVerificationError):  # a secret the worker does not hold
            verify(OTHER, seen.raw, seen.headers)
    assert int(retry.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])

    model.behaviour.mode_by_id = {"2": "text"}  # a failed task's callback is signed too
    failed = send(producer, {"args": {"id": 2}, "callback_url": f"{callback_receiver.url}/cb"}, queue=queue)
    seen = callback_receiver.wait_for(3)[2]
    assert verify(NEW, seen.raw, seen.headers)["state"] == "FAILURE"  # type: ignore[index]
    assert seen.headers["webhook-id"] == failed.id
    worker.wait_for_log(f"callback for task {failed.id} delivered")
    assert "FORWARDER_CALLBACK_SIGNING_SECRET='***'" in worker.output  # the config line at start
    assert_no_secret(worker.output, [OLD, NEW, OLD[6:], NEW[6:]])
