"""The callback hook: delivery, retries, timeouts, SSRF refusals and secrecy, against real HTTP servers.

Unit-level tests drive ``CallbackClient`` and ``CallbackHook`` in this process; the end-to-end tests run
the worker as in production (both pools) with a callback receiver started by the test.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import logging
import re
import socket
import ssl
import time

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import gateways.callback as callback_module
from devtools.demo import send
from devtools.servers import free_port, wait_for
from forwarder import deps
from forwarder.errors import HookError
from forwarder.hooks import HookRunner
from forwarder.hooks.callback import CallbackAuthError
from forwarder.settings import Settings
from gateways.callback import CallbackClient, CallbackError, CallbackRefused, DestinationGuard, forbidden_reason
from tests.support.callback import CallbackReceiver

SECRET = "s3cr3t-Passw0rd-\u00e9\u2603"  # non-latin-1 on purpose: sent as UTF-8
POOLS = ["prefork", "gevent"]


def client(allowed: tuple[str, ...] = ("127.0.0.1",), *, timeout: float = 2, attempts: int = 3,
           **kwargs: object) -> CallbackClient:
    return CallbackClient(timeout=timeout, attempts=attempts, allowed_hosts=allowed, backoff=0.02, **kwargs)


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.fixture(autouse=True)
def off_host_connects(monkeypatch) -> list[tuple]:
    """A fake transport for every address off this machine; returns the connections it refused.

    In this process, TCP connections to loopback (the tests' own servers) go through; any other
    (169.254.169.254, 10/8, fc00::/7, a public address) is recorded and refused with ECONNREFUSED before a
    packet is sent, so a broken guard (mutation testing) never reaches it. The end-to-end tests' workers
    are other processes: those tests use loopback callback URLs only.
    """
    refused: list[tuple] = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refused.append(tuple(address[:2]))
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"test transport: {address[0]} is off this machine")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return refused


def fake_resolver(*answers: list[str]):
    """A ``_getaddrinfo`` that returns the given address lists in turn (the last one repeats)."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[tuple]:
        calls.append(host)
        ips = answers[min(len(calls), len(answers)) - 1]
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


# ------------------------------------------------------------------------------- CallbackClient


def test_delivers_json_with_basic_auth_over_one_pooled_connection(callback_receiver):
    sender = client()
    body = {"result": '{"y": 1}', "status_code": 200, "task_id": "t-1"}
    sender.send(f"{callback_receiver.url}/cb?x=1", body, ("user", SECRET))
    sender.send(f"{callback_receiver.url}/cb?x=2", body, ("user", SECRET))
    first, second = callback_receiver.wait_for(2)
    assert first.method == "POST" and first.path == "/cb?x=1"
    assert first.body == body
    assert first.headers["content-type"] == "application/json"
    assert first.basic_auth == ("user", SECRET)
    assert first.headers["host"] == f"127.0.0.1:{callback_receiver.port}"
    # One session per process, and its kept-alive connection is reused.
    assert sender.session.builds == 1
    assert first.client == second.client


def test_no_auth_sends_no_authorization_header(callback_receiver):
    client().send(callback_receiver.url, {"task_id": "t"}, None)
    assert "authorization" not in callback_receiver.wait_for(1)[0].headers


def test_5xx_is_retried_until_success(callback_receiver):
    callback_receiver.statuses = [503, 500]
    client(attempts=3).send(callback_receiver.url, {"task_id": "t"}, ("u", "p"))
    assert len(callback_receiver.wait_for(3)) == 3


def test_5xx_every_time_gives_up_after_the_attempts(callback_receiver):
    callback_receiver.default_status = 502
    with pytest.raises(CallbackError) as caught:
        client(attempts=2).send(callback_receiver.url, {"task_id": "t"}, ("u", "p"))
    assert caught.value.attempts == 2 and caught.value.status_code == 502
    assert "failed after 2 attempt(s): HTTP 502" in str(caught.value)
    assert len(callback_receiver.received) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_4xx_is_not_retried(callback_receiver, status):
    callback_receiver.default_status = status
    with pytest.raises(CallbackError) as caught:
        client(attempts=3).send(callback_receiver.url, {"task_id": "t"}, ("u", "p"))
    assert caught.value.status_code == status and caught.value.attempts == 1
    assert not isinstance(caught.value, CallbackRefused)
    time.sleep(0.1)
    assert len(callback_receiver.received) == 1


def test_redirects_are_not_followed(callback_receiver):
    callback_receiver.default_status = 307
    with pytest.raises(CallbackError, match="redirects are not followed"):
        client().send(f"{callback_receiver.url}/cb", {"task_id": "t"}, ("u", "p"))
    time.sleep(0.1)
    assert [r.path for r in callback_receiver.received] == ["/cb"]


def test_hanging_server_times_out_within_timeout_times_attempts(callback_receiver):
    callback_receiver.hang = True
    started = time.monotonic()
    with pytest.raises(CallbackError, match="no answer within 0.5 s") as caught:
        client(timeout=0.5, attempts=2).send(callback_receiver.url, {"task_id": "t"}, ("u", "p"))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 0.5 * 2 + 1.0, elapsed
    assert caught.value.attempts == 2
    assert len(callback_receiver.received) == 2


def test_connection_refused_is_retried_then_reported():
    port = free_port()  # nothing listens there
    with pytest.raises(CallbackError, match=r"failed after 2 attempt\(s\): connection failed .*refused") as caught:
        client(attempts=2).send(f"http://127.0.0.1:{port}/cb", {"task_id": "t"}, ("u", "p"))
    assert not isinstance(caught.value, CallbackRefused)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:{port}/cb", "loopback"),
        ("http://localhost:{port}/cb", "localhost resolves to 127.0.0.1, which is loopback"),
        ("http://2130706433:{port}/cb", "resolves to 127.0.0.1"),  # decimal form of 127.0.0.1
        ("http://[::1]:{port}/cb", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/cb", "IPv4-mapped loopback"),
        ("http://[::ffff:169.254.169.254]/x", "IPv4-mapped link-local"),
        ("http://169.254.169.254/latest/meta-data/", "link-local (cloud metadata)"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://10.0.0.1/x", "private"),
        ("http://172.16.5.4/x", "private"),
        ("http://192.168.1.1/x", "private"),
        ("http://[fc00::1]/x", "private"),
        ("http://0.0.0.0:{port}/x", "unspecified"),
        ("http://[::]:{port}/x", "unspecified"),
        ("http://224.0.0.1/x", "multicast"),
        ("http://240.0.0.1/x", "reserved"),
        ("http://100.64.0.1/x", "non-global"),
        ("http://[2002:7f00:1::]/x", "6to4 loopback"),
    ],
)
def test_internal_destinations_are_refused_without_any_request(callback_receiver, off_host_connects, url, reason):
    with pytest.raises(CallbackRefused, match=re.escape(reason)):
        client(allowed=()).send(url.format(port=callback_receiver.port), {"task_id": "t"}, ("u", SECRET))
    time.sleep(0.05)
    assert callback_receiver.received == []
    assert off_host_connects == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "scheme 'ftp' is not allowed"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://example.com/x", "scheme 'gopher' is not allowed"),
        ("//example.com/x", "scheme '' is not allowed"),
        (f"http://user:{SECRET}@example.com/x", "must not contain credentials"),
        ("http://user@example.com/x", "must not contain credentials"),
        ("http:///x", "names no host|not a valid"),
    ],
)
def test_bad_urls_are_refused(url, reason):
    with pytest.raises(CallbackRefused, match=reason) as caught:
        client(allowed=()).send(url, {"task_id": "t"}, None)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("allowed", [("127.0.0.1",), ("127.0.0.0/8",), ("10.0.0.0/8", "127.0.0.1/32")])
def test_allow_list_admits_matching_addresses(callback_receiver, allowed):
    client(allowed=allowed).send(f"{callback_receiver.url}/cb", {"task_id": "t"}, None)
    assert len(callback_receiver.wait_for(1)) == 1


def test_allow_list_admits_a_host_name(callback_receiver):
    client(allowed=("LocalHost.",)).send(f"http://localhost:{callback_receiver.port}/cb", {"task_id": "t"}, None)
    assert callback_receiver.wait_for(1)[0].headers["host"] == f"localhost:{callback_receiver.port}"


@pytest.mark.parametrize(
    ("allowed", "url"),
    [
        (("10.0.0.0/8",), "http://127.0.0.1:{port}/cb"),
        (("example.com",), "http://127.0.0.1:{port}/cb"),
        (("127.0.0.1",), "http://93.184.216.34/cb"),  # public, but not listed: refused before any I/O
        (("127.0.0.1",), "http://[::1]:{port}/cb"),
    ],
)
def test_allow_list_refuses_everything_else(callback_receiver, allowed, url):
    with pytest.raises(CallbackRefused, match="not in the allowed callback hosts"):
        client(allowed=allowed).send(url.format(port=callback_receiver.port), {"task_id": "t"}, None)
    assert callback_receiver.received == []


def test_a_host_is_refused_when_any_of_its_addresses_is_internal(monkeypatch, callback_receiver):
    monkeypatch.setattr(callback_module, "_getaddrinfo", fake_resolver(["93.184.216.34", "127.0.0.1"]))
    with pytest.raises(CallbackRefused, match="resolves to 127.0.0.1, which is loopback"):
        client(allowed=()).send(f"http://mixed.test:{callback_receiver.port}/cb", {"task_id": "t"}, None)
    assert callback_receiver.received == []


def test_dns_rebinding_is_caught_when_the_connection_opens(monkeypatch, callback_receiver):
    # First answer (the pre-flight check) is public; the second (at connect time) points at loopback.
    # Faked at the socket level, so a connection resolving the name by itself would get it too. One
    # attempt: with more, the next attempt's pre-flight check would read the loopback answer and refuse
    # it, whether or not the connection checked.
    resolver = fake_resolver(["93.184.216.34"], ["127.0.0.1"])
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        return resolver(host, port) if host == "rebind.test" else real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(CallbackRefused, match="rebind.test resolves to 127.0.0.1, which is loopback"):
        client(allowed=(), attempts=1).send(f"http://rebind.test:{callback_receiver.port}/cb", {"task_id": "t"}, None)
    assert resolver.calls == ["rebind.test", "rebind.test"]
    time.sleep(0.05)
    assert callback_receiver.received == []


def test_connection_goes_to_the_checked_address_under_the_original_host_name(monkeypatch, callback_receiver):
    monkeypatch.setattr(callback_module, "_getaddrinfo", fake_resolver(["127.0.0.1"]))
    client(allowed=("127.0.0.0/8",)).send(f"http://pinned.test:{callback_receiver.port}/cb", {"task_id": "t"}, None)
    assert callback_receiver.wait_for(1)[0].headers["host"] == f"pinned.test:{callback_receiver.port}"


def _tls_files(tmp_path, name: str) -> tuple[str, ssl.SSLContext]:
    """A throwaway CA (its PEM path) and a server context with a certificate for ``name``."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, san: str | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san or subject)]), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf = cert(name, leaf_key, "test CA", ca_key, ca=False)
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return str(ca_path), context


def test_https_to_a_pinned_address_keeps_sni_and_certificate_checks(monkeypatch, tmp_path):
    ca_path, context = _tls_files(tmp_path, "callback.test")
    receiver = CallbackReceiver(tls=context).start()
    try:
        monkeypatch.setattr(callback_module, "_getaddrinfo", fake_resolver(["127.0.0.1"]))
        sender = client(allowed=("127.0.0.1",), attempts=1, verify=ca_path)
        sender.send(f"https://callback.test:{receiver.port}/cb", {"task_id": "t"}, ("u", SECRET))
        seen = receiver.wait_for(1)[0]
        assert seen.basic_auth == ("u", SECRET)
        assert seen.headers["host"] == f"callback.test:{receiver.port}"
        assert receiver.server_names == ["callback.test"]  # SNI is the URL's name, not the pinned IP
        # The certificate is checked against the URL's host name, not the address connected to.
        with pytest.raises(CallbackError, match="CERTIFICATE_VERIFY_FAILED|[Hh]ostname mismatch"):
            sender.send(f"https://other.test:{receiver.port}/cb", {"task_id": "t"}, ("u", SECRET))
        assert len(receiver.received) == 1
    finally:
        receiver.stop()


def test_password_never_appears_in_errors_or_logs(callback_receiver, caplog):
    caplog.set_level(logging.DEBUG)
    sender = client(attempts=2, timeout=0.3)
    errors: list[BaseException] = []
    for status in (503, 401, 302):
        callback_receiver.default_status = status
        with pytest.raises(CallbackError) as caught:
            sender.send(f"{callback_receiver.url}/cb", {"task_id": "t"}, ("user", SECRET))
        errors.append(caught.value)
    callback_receiver.hang = True
    for url in (f"{callback_receiver.url}/cb", f"http://127.0.0.1:{free_port()}/cb", "http://10.1.2.3/"):
        with pytest.raises(CallbackError) as caught:
            sender.send(url, {"task_id": "t"}, ("user", SECRET))
        errors.append(caught.value)
    token = "Basic"  # the header name may appear in no message either
    for error in errors:
        text = f"{error} {error!r} {error.args}"
        assert SECRET not in text and token not in text
        assert error.__cause__ is None and error.__context__ is None  # no request (headers) kept alive
    assert SECRET not in caplog.text and "Authorization" not in caplog.text
    assert "attempt 1/2 failed" in caplog.text  # the retries were logged, without secrets


def test_forbidden_reason_covers_embedded_ipv4():
    assert forbidden_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert forbidden_reason(ipaddress.ip_address("2606:4700:4700::1111")) is None
    assert forbidden_reason(ipaddress.ip_address("::ffff:8.8.8.8")) is None
    assert forbidden_reason(ipaddress.ip_address("::ffff:10.0.0.1")) == "IPv4-mapped private"
    assert forbidden_reason(ipaddress.ip_address("fd00:ec2::254")) is not None
    assert forbidden_reason(ipaddress.ip_address("2001:db8::1")) is not None  # documentation range


def test_guard_parses_names_ips_and_cidrs():
    guard = DestinationGuard([" hooks.example.com ", "10.1.0.0/16", "192.0.2.7", "[2001:db8::1]", ""])
    assert guard.names == {"hooks.example.com"}
    assert [str(n) for n in guard.networks] == ["10.1.0.0/16", "192.0.2.7/32", "2001:db8::1/128"]
    assert guard.resolve("10.1.2.3", 80) == ["10.1.2.3"]
    assert guard.resolve("[::ffff:10.1.2.3]", 80) == ["::ffff:10.1.2.3"]  # mapped form of a listed address
    with pytest.raises(CallbackRefused):
        guard.resolve("10.2.0.1", 80)
    assert not DestinationGuard(["", " "]).restricted


# -------------------------------------------------------------------------------- CallbackHook


def settings(**env: str) -> Settings:
    return Settings.from_env({"FORWARDER_HOOKS": "callback", "FORWARDER_CALLBACK_TIMEOUT": "2", **env})


def test_hook_uses_the_requests_url_and_basic_auth(callback_receiver, caplog):
    caplog.set_level(logging.INFO)
    hook = deps.callback_hook(settings(FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1"))
    request = {
        "args": {"x": 1},
        "callback_url": f"{callback_receiver.url}/done?token=abc",
        "callback_auth": {"kind": "basic", "username": "u", "password": SECRET},
    }
    HookRunner([hook]).run(request, {"result": "r", "status_code": 200}, "task-9")
    seen = callback_receiver.wait_for(1)[0]
    assert seen.body == {"result": "r", "status_code": 200, "task_id": "task-9"}
    assert seen.basic_auth == ("u", SECRET)
    assert f"callback for task task-9 delivered to 127.0.0.1:{callback_receiver.port}" in caplog.text
    assert SECRET not in caplog.text and "token=abc" not in caplog.text


def test_hook_falls_back_to_the_default_url_and_auth(callback_receiver):
    hook = deps.callback_hook(settings(
        FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.0/8",
        FORWARDER_CALLBACK_URL=f"{callback_receiver.url}/default",
        FORWARDER_CALLBACK_AUTH_USERNAME="endpoint-user",
        FORWARDER_CALLBACK_AUTH_PASSWORD=SECRET,
    ))
    hook({"args": {}}, {"result": "r", "task_id": "t1"}, "t1")
    hook({"args": {}, "callback_auth": None, "callback_url": ""}, {"result": "r", "task_id": "t2"}, "t2")
    first, second = callback_receiver.wait_for(2)
    assert first.path == second.path == "/default"
    assert first.basic_auth == second.basic_auth == ("endpoint-user", SECRET)


def test_hook_without_any_url_returns_quietly(callback_receiver, caplog):
    caplog.set_level(logging.DEBUG, logger="forwarder.hooks.callback")
    hook = deps.callback_hook(settings())
    hook({"args": {}}, {"result": "r", "task_id": "t"}, "t")
    assert "no callback URL" in caplog.text
    assert callback_receiver.received == []


def test_mtls_kind_sends_the_endpoint_user_with_an_empty_password_and_warns(callback_receiver, caplog):
    hook = deps.callback_hook(settings(
        FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        FORWARDER_ENDPOINT_USER_ID="endpoint-user",
        FORWARDER_CALLBACK_AUTH_USERNAME="default-user",
        FORWARDER_CALLBACK_AUTH_PASSWORD=SECRET,
    ))
    request = {"callback_url": callback_receiver.url, "callback_auth": {"kind": "mtls", "cert": "C", "key": "K"}}
    hook(request, {"result": "r", "task_id": "t"}, "t")
    assert callback_receiver.wait_for(1)[0].basic_auth == ("endpoint-user", "")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mTLS" in warnings[0].getMessage()


def test_no_auth_anywhere_sends_the_endpoint_user_as_llm_engine_does(callback_receiver):
    hook = deps.callback_hook(settings(FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
                                       FORWARDER_ENDPOINT_USER_ID="endpoint-user"))
    hook({"callback_url": callback_receiver.url}, {"result": "r", "task_id": "t"}, "t")
    assert callback_receiver.wait_for(1)[0].basic_auth == ("endpoint-user", "")


def test_a_failure_callback_carries_the_error_text_and_no_trace(callback_receiver):
    hook = deps.callback_hook(settings(FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1"))
    error = {"error": "model said no", "error_metadata": "Internal failure\nTraceback (most recent call last): ..."}
    hook({"callback_url": callback_receiver.url, "callback_auth": basic()}, {**error, "task_id": "t"}, "t", "FAILURE")
    seen = callback_receiver.wait_for(1)[0]
    assert seen.body == {"task_id": "t", "state": "FAILURE", "error": "model said no"}
    assert seen.basic_auth == ("u", SECRET)


@pytest.mark.parametrize(
    "auth",
    [
        "basic",
        ["basic", "u", SECRET],
        {"username": "u", "password": SECRET},
        {"kind": 3, "username": "u", "password": SECRET},
        {"kind": "basic", "username": "u"},
        {"kind": "basic", "username": None, "password": SECRET},
        {"kind": "basic", "username": "u", "password": 12345},
    ],
)
def test_malformed_callback_auth_is_a_clear_error_that_hides_the_password(callback_receiver, auth):
    hook = deps.callback_hook(settings(FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1"))
    with pytest.raises(CallbackAuthError, match="callback_auth") as caught:
        hook({"callback_url": callback_receiver.url, "callback_auth": auth}, {"task_id": "t"}, "t")
    assert SECRET not in str(caught.value) and "12345" not in str(caught.value)
    assert callback_receiver.received == []


def test_non_string_callback_url_is_an_error():
    hook = deps.callback_hook(settings())
    with pytest.raises(HookError, match="callback_url must be a string"):
        hook({"callback_url": ["http://example.com"]}, {"task_id": "t"}, "t")


# ---------------------------------------------------------------------------------- end to end

CALLBACK_ENV = {
    "FORWARDER_HOOKS": "callback",
    "FORWARDER_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
    "FORWARDER_CALLBACK_TIMEOUT": "1",
    "FORWARDER_CALLBACK_RETRIES": "2",
}


def basic(password: str = SECRET) -> dict[str, str]:
    return {"kind": "basic", "username": "u", "password": password}


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_callback_delivered_with_auth_and_refused_for_forbidden_hosts(
    pool, start_worker, producer, model, queue, callback_receiver
):
    worker = start_worker(pool, **CALLBACK_ENV)
    delivered = send(producer, {"args": {"id": 1}, "callback_url": f"{callback_receiver.url}/cb",
                                "callback_auth": basic()}, queue=queue)
    value = delivered.get(timeout=30)
    seen = callback_receiver.wait_for(1)[0]
    assert seen.path == "/cb" and seen.basic_auth == ("u", SECRET)
    assert seen.body == {**value, "task_id": delivered.id}
    assert seen.body["status_code"] == 200

    refused = send(producer, {"args": {"id": 2}, "callback_url": "http://169.254.169.254/latest/meta-data/",
                              "callback_auth": basic()}, queue=queue)
    assert refused.get(timeout=30)["status_code"] == 200 and refused.status == "SUCCESS"
    worker.wait_for_log(f"hook callback failed for task {refused.id}: CallbackRefused", timeout=20)
    worker.wait_for_log(f"callback for task {delivered.id} delivered to 127.0.0.1:{callback_receiver.port}")
    assert len(callback_receiver.received) == 1
    assert SECRET not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_hanging_callback_changes_no_result_and_the_worker_keeps_serving(
    pool, start_worker, producer, model, queue, callback_receiver, redis_server
):
    # One slot: the next task can only run once the hanging callback has been given up on.
    worker = start_worker(pool, CELERY_WORKER_CONCURRENCY="1", **CALLBACK_ENV)
    callback_receiver.hang = True
    started = time.monotonic()
    hanging = send(producer, {"args": {"id": 1}, "callback_url": callback_receiver.url, "callback_auth": basic()},
                   queue=queue)
    assert hanging.get(timeout=30)["status_code"] == 200  # stored before the hook runs
    assert hanging.status == "SUCCESS"
    after = send(producer, {"args": {"id": 2}}, queue=queue)
    assert after.get(timeout=30)["status_code"] == 200
    # 2 attempts x 1 s read timeout, plus a backoff below 0.5 s, plus task overhead.
    assert time.monotonic() - started < 15
    worker.wait_for_log(f"hook callback failed for task {hanging.id}: CallbackError", timeout=10)
    assert "no answer within 1 s" in worker.output
    assert len(callback_receiver.received) == 2  # both attempts
    # What llm-engine's gateway reads after the hook gave up: still the model's result.
    backend = redis.Redis.from_url(f"{redis_server.url}/1")
    meta = json.loads(backend.get(f"celery-task-meta-{hanging.id}"))
    backend.close()
    assert meta["status"] == "SUCCESS" and meta["result"] == hanging.result
    assert SECRET not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_failed_task_fires_the_callback_with_the_error_text(
    pool, start_worker, producer, model, queue, callback_receiver
):
    worker = start_worker(pool, **CALLBACK_ENV)
    model.behaviour.mode = "text"  # the model answers with a body that is not JSON
    failed = send(producer, {"args": {"id": 1}, "callback_url": callback_receiver.url, "callback_auth": basic()},
                  queue=queue)
    with pytest.raises(Exception, match="not JSON"):
        failed.get(timeout=30)
    assert failed.status == "FAILURE"
    seen = callback_receiver.wait_for(1)[0]
    assert seen.basic_auth == ("u", SECRET)
    assert set(seen.body) == {"task_id", "state", "error"}  # no error_metadata: no stack trace leaves
    assert seen.body["task_id"] == failed.id and seen.body["state"] == "FAILURE"
    assert "not JSON" in seen.body["error"] and seen.body["error"] == str(failed.result)
    wait_for(lambda: "delivered to" in worker.output, 10, "the callback's log line")
    assert SECRET not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_internal_callback_hosts_are_refused_without_an_allow_list(
    pool, start_worker, producer, model, queue, callback_receiver
):
    # The default mode: no allow-list, so the internal-address check alone stands between a request's
    # callback_url and the worker's network. Every URL names the test's own receiver on loopback, so a
    # broken guard would deliver there (and send nothing off this machine); the metadata service, 10/8
    # and fc00::/7 are refused by the unit tests above, over the fake transport.
    env = {name: value for name, value in CALLBACK_ENV.items() if name != "FORWARDER_CALLBACK_ALLOWED_HOSTS"}
    worker = start_worker(pool, **env)
    port = callback_receiver.port
    reasons = {
        f"http://127.0.0.1:{port}/cb": "callback address 127.0.0.1 is loopback; refused",
        f"http://localhost:{port}/cb": "callback host localhost resolves to ",  # 127.0.0.1 or ::1
        f"http://2130706433:{port}/cb": "resolves to 127.0.0.1, which is loopback; refused",
        f"http://[::ffff:127.0.0.1]:{port}/cb": "which is IPv4-mapped loopback; refused",
    }
    sent = {
        send(producer, {"args": {"id": i}, "callback_url": url, "callback_auth": basic()}, queue=queue): reason
        for i, (url, reason) in enumerate(reasons.items())
    }
    for result in sent:
        assert result.get(timeout=30)["status_code"] == 200 and result.status == "SUCCESS"

    def outcomes() -> dict[str, str] | None:
        # Each task's hook ends in one line: delivered (the guard let it through) or failed.
        ends = {result.id: (f"callback for task {result.id} delivered", f"hook callback failed for task {result.id}:")
                for result in sent}
        found = {task: line for line in worker.output.splitlines() for task, texts in ends.items()
                 if any(text in line for text in texts)}
        return found if len(found) == len(sent) else None

    lines = wait_for(outcomes, 20, "the callback hook's outcome for every task")
    for result, reason in sent.items():
        assert f"failed for task {result.id}: CallbackRefused: " in lines[result.id], lines[result.id]
        assert reason in lines[result.id] and "loopback" in lines[result.id], lines[result.id]
    assert callback_receiver.received == []
    assert SECRET not in worker.output
