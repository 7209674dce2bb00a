"""What our code relies on in other libraries' private internals, checked in process in milliseconds.

Each test names the upstream symbol, asserts the exact shape relied upon (it exists, its signature, its
behaviour on a minimal in-process object) and, when it breaks, says which versions it was checked on,
what to look at, and which file of ours to fix. Where a public API does the job we use it instead:

- ``forwarder/tasks.py``: Celery ``Request``'s public properties (``args``, ``kwargs``, ``request_dict``,
  ``message``, ``connection_errors``), pinned here only for ``request_dict`` being the live dict.
- ``forwarder/model_call.py``: ``celery.current_task`` (not ``celery._state``).
- ``forwarder/extensions/secret_logs.py``: known secret values are masked on every handler whatever the
  format; the Celery log-format constants only make the refused-message redaction precise, and an
  unrecognised line fails closed (``tests/test_secret_logs.py``). Their shape is pinned here.

Kept, and pinned below: kombu Redis ``QoS.restore_visible``/``restore_by_tag`` (redelivery counting), kombu
SQS ``Channel._schedule_queue``/``_loop1``, Celery ``Request.acknowledge``/``reject``/``on_failure``, Celery
key-value backends' ``_get_task_meta_for``/``_store_result``/``_get_result_meta``/``_set_with_state``,
``celery.apps.worker.safe_say``, urllib3 ``HTTPConnection._new_conn``/``_dns_host``, kombu virtual
``Channel._qos`` and ``Message._raw``.

Private names used that need no test here:

- kombu virtual ``QoS._delivered``/``_dirty``/``_remove_from_indices``/``restore_by_tag``/``append`` and
  ``Channel.do_restore``: pinned in ``tests/test_reconnect_contract.py`` (acks, reconnect).
- kombu Redis ``Channel._brpop_start``/``_brpop_read`` (with ``_in_poll``, ``_brpop_sent_at``,
  ``_queue_cycle``) and ``QoS.append``, overridden by ``gateways/redis_transport.py`` (BLMOVE into an
  in-transit list): pinned in ``tests/test_in_transit.py``.
- ``celery.apps.worker._original_os_write`` (``extensions/task_log.py``): read with ``getattr`` and
  ``os.write`` as the fallback; only a gevent-patched write would be used instead of the raw one.
- ``urllib.parse.SplitResult._replace`` (``forwarder/urls.py``): public namedtuple API despite its name.
- ``Metrics._reset_after_fork`` (``gateways/dogstatsd.py``): our own method.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import socket
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.apps import worker as celery_worker
from celery.backends.base import BaseKeyValueStoreBackend
from celery.contrib.testing.mocks import TaskMessage
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.request import Request
from kombu.transport import SQS, virtual
from kombu.transport import redis as kombu_redis
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from forwarder.extensions import redelivery, secret_logs, task_log
from forwarder.extensions.delivery_cap import RECEIVE_COUNT_KEY
from forwarder.tasks import CheckedRequest
from gateways import callback, sqs_transport

#: The versions these contracts were last checked on (update after checking an upgrade).
CHECKED_ON = {"celery": "5.7.0", "kombu": "5.7.0", "urllib3": "2.8.0", "requests": "2.34.2"}


def broke(symbol: str, dists: tuple[str, ...], ours: str, what: str) -> str:
    """The failure message: the symbol, the versions installed now, what to look at and our file to fix."""
    installed = ", ".join(f"{dist} {importlib.metadata.version(dist)}" for dist in dists)
    checked = ", ".join(f"{dist} {CHECKED_ON[dist]}" for dist in dists)
    return (f"upstream contract broken: {symbol} (installed: {installed}; last checked on {checked}). {what} "
            f"Fix: {ours}.")


def params(func: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(func).parameters)


def code_names(*objects: Any) -> set[str]:
    """Every global or attribute name the code of ``objects`` (and the functions nested in it) looks up."""
    names: set[str] = set()
    todo = [getattr(obj, "__code__", obj) for obj in objects]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return names


def module_code_names(module: types.ModuleType) -> set[str]:
    functions = [obj for obj in vars(module).values() if inspect.isfunction(obj) and obj.__module__ == module.__name__]
    return code_names(*functions)


# -------------------------------------------------------- kombu Redis QoS: forwarder/extensions/redelivery.py


class FakeLock:
    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass


class FakeClient:
    """What kombu's ``restore_visible`` asks of a Redis client: a lock, and the unacked index."""

    def __init__(self, tags: list[bytes]) -> None:
        self.tags = tags

    def lock(self, name: str, timeout: float | None = None) -> FakeLock:
        return FakeLock()

    def zrange(self, *args: Any, **kwargs: Any) -> list[tuple[bytes, float]]:
        return [(tag, 1.0) for tag in self.tags]

    zrevrangebyscore = zrange  # kombu < 5.7 reads the index with it


class FakeRedisChannel:
    visibility_timeout = 1.0
    unacked_index_key = "unacked_index"
    unacked_mutex_key = "unacked_mutex"
    unacked_mutex_expire = 300

    def __init__(self, client: FakeClient) -> None:
        self.client = client

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[FakeClient]:
        yield self.client


class RecordingQoS(kombu_redis.QoS):
    """kombu's Redis QoS whose ``restore_by_tag`` records instead of writing to Redis."""

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        self.restored = [*getattr(self, "restored", []), (tag, client, leftmost)]


def test_kombu_redis_restore_visible_restores_through_restore_by_tag_which_redelivery_counts():
    ours = "forwarder/extensions/redelivery.py (restore_counted)"
    assert params(kombu_redis.QoS.restore_visible) == ["self", "start", "num", "interval"], broke(
        "kombu.transport.redis.QoS.restore_visible", ("kombu",), ours,
        "Its parameters changed; restore_counted calls it with num= and interval=1.")
    assert params(kombu_redis.QoS.restore_by_tag) == ["self", "tag", "client", "leftmost"], broke(
        "kombu.transport.redis.QoS.restore_by_tag", ("kombu",), ours,
        "Its parameters changed; restore_counted wraps it with (tag, client, leftmost).")
    client = FakeClient([b"tag-1", b"tag-2"])
    qos = RecordingQoS(FakeRedisChannel(client))  # type: ignore[arg-type]
    try:
        restored = redelivery.restore_counted(qos, 10)
    finally:
        qos._on_collect.cancel()
    assert restored == 2 and qos.restored == [(b"tag-1", client, False), (b"tag-2", client, False)], broke(
        "kombu.transport.redis.QoS.restore_visible", ("kombu",), ours,
        "It no longer hands each visible message back through self.restore_by_tag(tag, client): redeliveries are "
        "not counted and the delivery cap stops working. Count restores another way (kombu may now return them).")
    assert "restore_by_tag" not in vars(qos), broke(
        "kombu.transport.redis.QoS", ("kombu",), ours, "The counting shadow was not removed from the instance.")


# ------------------------------------------------------------- kombu SQS Channel: gateways/sqs_transport.py


class FakeHub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, ...]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> None:
        self.calls.append(("later", delay, callback, *args))

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.calls.append(("soon", callback, *args))


def sqs_channel(cls: type, can_consume: bool) -> Any:
    """A channel of ``cls`` with only what ``_schedule_queue`` reads: no connection, no SQS."""
    channel = object.__new__(cls)
    channel._active_queues = ["q"]
    channel._qos = types.SimpleNamespace(can_consume=lambda: can_consume)
    channel.hub = FakeHub()
    channel.connection = types.SimpleNamespace(polling_interval=1.0)
    channel.fetched = []
    channel._get_bulk_async = lambda queue, callback=None: channel.fetched.append(queue)
    return channel


def test_kombu_sqs_schedule_queue_is_the_polling_step_our_channel_overrides():
    ours = "gateways/sqs_transport.py (Channel._schedule_queue)"
    assert params(SQS.Channel._schedule_queue) == ["self", "queue"], broke(
        "kombu.transport.SQS.Channel._schedule_queue", ("kombu",), ours, "Its parameters changed.")
    assert params(SQS.Channel._loop1)[:2] == ["self", "queue"], broke(
        "kombu.transport.SQS.Channel._loop1", ("kombu",), ours, "Its parameters changed.")
    assert isinstance(inspect.getattr_static(virtual.Channel, "qos"), property), broke(
        "kombu.transport.virtual.Channel.qos", ("kombu",), ours, "No longer a property over _qos.")

    upstream_full = sqs_channel(SQS.Channel, can_consume=False)
    SQS.Channel._schedule_queue(upstream_full, "q")
    # kombu 5.7 waits polling_interval with a full prefetch window (the slowness our override fixes); kombu 5.6
    # re-checks on the very next loop turn (a busy loop while the window stays full, which the override paces).
    assert upstream_full.hub.calls in ([("later", 1.0, upstream_full._schedule_queue, "q")],
                                       [("soon", upstream_full._schedule_queue, "q")]), broke(
        "kombu.transport.SQS.Channel._schedule_queue", ("kombu",), ours,
        "With a full prefetch window kombu neither waits polling_interval (5.7) nor re-checks on the next turn "
        "(5.6): read its new behaviour; if it now re-checks promptly without spinning, delete the override.")

    full = sqs_channel(sqs_transport.Channel, can_consume=False)
    full._schedule_queue("q")
    assert full.hub.calls == [("later", sqs_transport.WINDOW_CHECK_INTERVAL, full._schedule_queue, "q")]
    assert full.fetched == []
    free = sqs_channel(sqs_transport.Channel, can_consume=True)
    free._schedule_queue("q")
    assert free.fetched == ["q"] and free.hub.calls == [], broke(
        "kombu.transport.SQS.Channel._schedule_queue", ("kombu",), ours,
        "With a free prefetch window kombu no longer polls through self._get_bulk_async(queue, callback=...).")


# ---------------------------------------------------------------- Celery Request: forwarder/tasks.py


def test_celery_request_public_properties_and_the_methods_checked_request_overrides():
    ours = "forwarder/tasks.py (CheckedRequest)"
    for name in ("acknowledge", "reject", "on_failure", "send_event"):
        assert callable(getattr(Request, name, None)), broke(f"celery.worker.request.Request.{name}", ("celery",),
                                                             ours, "Gone.")
    assert params(Request.reject) == ["self", "requeue"]
    assert params(Request.on_failure) == ["self", "exc_info", "send_failed_event", "return_ok"], broke(
        "celery.worker.request.Request.on_failure", ("celery",), ours, "Its parameters changed.")
    for name in ("message", "args", "kwargs", "request_dict", "connection_errors"):
        assert isinstance(inspect.getattr_static(Request, name, None), property), broke(
            f"celery.worker.request.Request.{name}", ("celery",), ours, "No longer a public property.")

    app = Celery(set_as_current=False)

    def run(*args: Any) -> None:
        pass

    task = app.task(name="contract.task", shared=False)(run)
    message = TaskMessage(task.name, id="t-1", args=[{"x": 1}, 1.0], kwargs={})
    message.delivery_info = {"sqs_message": {"Attributes": {"ApproximateReceiveCount": "3"}}}
    request = CheckedRequest(message, app=app, task=task, connection_errors=(OSError,))
    assert request.message is message and request.connection_errors == (OSError,)
    assert request.args == [{"x": 1}, 1.0] and request.kwargs == {}
    # Celery hands _request_dict to the pool (execute_using_pool): the property must be that very dict.
    assert request.request_dict is request._request_dict and "_request_dict" in code_names(Request.execute_using_pool), \
        broke("celery.worker.request.Request.request_dict", ("celery",), ours,
              "It is no longer the dict Celery hands to the pool: the SQS receive count would not reach the task.")
    assert request.request_dict[RECEIVE_COUNT_KEY] == 3 and request.acknowledged is False, broke(
        "celery.worker.request.Request.request_dict", ("celery",), ours,
        "It is no longer the live dict the task's context is built from: the SQS receive count (the delivery "
        "cap's input) is lost.")


# ------------------------------------------------- Celery key-value backends: forwarder/tasks.py, result_backends.py


def test_celery_key_value_backend_internals_the_result_store_uses():
    ours = "forwarder/tasks.py (outcome_stored) and forwarder/result_backends.py (FirstStartWritesOnly)"
    shapes = {
        "_get_task_meta_for": ["self", "task_id"],
        "_store_result": ["self", "task_id", "result", "state", "traceback", "request", "kwargs"],
        "_get_result_meta": ["self", "result", "state", "traceback", "request", "format_date", "encode"],
        "_set_with_state": ["self", "key", "value", "state"],
    }
    for name, expected in shapes.items():
        assert params(getattr(BaseKeyValueStoreBackend, name)) == expected, broke(
            f"celery.backends.base.BaseKeyValueStoreBackend.{name}", ("celery",), ours, "Its parameters changed.")
    backend = Celery(set_as_current=False, backend="cache+memory://").backend
    backend.store_result("t-2", {"ok": 1}, "SUCCESS")
    assert backend._get_task_meta_for("t-2")["status"] == "SUCCESS", broke(
        "celery.backends.base.BaseKeyValueStoreBackend._get_task_meta_for", ("celery",), ours,
        "It no longer returns the stored meta with its status.")
    meta = backend._get_result_meta(result=None, state="STARTED", traceback=None, request=None)
    backend._set_with_state(backend.get_key_for_task("t-3"), backend.encode({**meta, "task_id": "t-3"}), "STARTED")
    assert backend._get_task_meta_for("t-3")["status"] == "STARTED", broke(
        "celery.backends.base.BaseKeyValueStoreBackend._set_with_state", ("celery",), ours,
        "A meta written with _get_result_meta + _set_with_state is no longer what Celery reads back.")


# --------------------------------------------- Celery log formats: forwarder/extensions/secret_logs.py


def test_celery_consumer_log_formats_the_secret_filter_recognises():
    ours = "forwarder/extensions/secret_logs.py (KNOWN_FORMATS)"
    what = ("The refused-message filter no longer recognises this line: it now hides every body-like argument "
            "(fails closed) and loses the precise redaction that keeps the task name and id.")
    for name, (count, _hide) in secret_logs.KNOWN_FORMATS.items():
        fmt = getattr(celery_consumer, name, None)
        assert isinstance(fmt, str) and secret_logs._placeholders(fmt) == count, broke(
            f"celery.worker.consumer.consumer.{name}", ("celery",), ours, what)
        assert name in module_code_names(celery_consumer) | code_names(
            *[f for f in vars(celery_consumer.Consumer).values() if inspect.isfunction(f)]), broke(
            f"celery.worker.consumer.consumer.{name}", ("celery",), ours, "Celery no longer logs with it. " + what)


# --------------------------------------------------- Celery's safe_say: forwarder/extensions/task_log.py


def test_celery_safe_say_is_looked_up_by_name_so_the_json_writer_replaces_it(monkeypatch):
    ours = "forwarder/extensions/task_log.py (_say_in_json)"
    assert params(celery_worker.safe_say) == ["msg", "f"], broke(
        "celery.apps.worker.safe_say", ("celery",), ours, "Its parameters changed.")
    assert "safe_say" in module_code_names(celery_worker), broke(
        "celery.apps.worker.safe_say", ("celery",), ours,
        "Celery's signal handlers no longer call the module's safe_say: the shutdown lines are no longer JSON.")
    monkeypatch.setattr(celery_worker, "safe_say", celery_worker.safe_say)  # restored after the test
    task_log._say_in_json()
    read, write = os.pipe()
    with os.fdopen(write, "w") as out:
        celery_worker.safe_say("worker: Warm shutdown (MainProcess)", out)
    with os.fdopen(read) as got:
        line = json.loads(got.read())
    assert line["message"] == "worker: Warm shutdown (MainProcess)" and line["logger"] == celery_worker.__name__


# --------------------------------------------------- urllib3 connections: gateways/callback.py


class RefusingGuard(callback.DestinationGuard):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1",))
        self.asked: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        raise callback.CallbackRefused("refused at connect")


def test_urllib3_new_conn_is_where_every_connection_opens_its_socket():
    ours = "gateways/callback.py (_GuardedConnectionMixin._new_conn)"
    what = ("The SSRF check at connect time would be skipped (or callbacks fail). Check how urllib3 opens a "
            "socket now; a documented hook may replace the override.")
    assert params(HTTPConnection._new_conn) == ["self"], broke("urllib3.connection.HTTPConnection._new_conn",
                                                               ("urllib3",), ours, what)
    for cls in (HTTPConnection, HTTPSConnection):
        assert "_new_conn" in code_names(cls.connect), broke(f"urllib3.connection.{cls.__name__}.connect",
                                                             ("urllib3",), ours, "It no longer calls _new_conn. " + what)
    assert params(urllib3_connection.create_connection) == ["address", "timeout", "source_address", "socket_options"]
    assert params(NameResolutionError.__init__) == ["self", "host", "conn", "reason"]
    assert params(NewConnectionError.__init__) == ["self", "conn", "message"]
    assert issubclass(ConnectTimeoutError, Exception)
    conn = HTTPConnection("Example.COM.", 8080, timeout=3, socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)])
    for attr in ("_dns_host", "host", "port", "timeout", "source_address", "socket_options"):
        assert hasattr(conn, attr), broke(f"urllib3.connection.HTTPConnection.{attr}", ("urllib3",), ours, what)

    guard = RefusingGuard()
    session = callback.build_session(guard, pool_size=1)
    with pytest.raises(callback.CallbackRefused):
        session.post("http://203.0.113.7:9/x", data=b"{}", timeout=1)
    session.close()
    assert guard.asked == [("203.0.113.7", 9)], broke(
        "urllib3.connection.HTTPConnection._new_conn", ("urllib3", "requests"), ours,
        "A request no longer opens its socket through the guarded connection class. " + what)


# ------------------------------------------- kombu virtual transport: forwarder/acks.py, extensions/reconnect.py


def test_kombu_virtual_channel_qos_cache_and_message_raw_payload():
    ours = "forwarder/acks.py (keeps_unacked_by_tag), forwarder/extensions/reconnect.py (held_tags, hand_back_unsure)"
    assert "_qos" in code_names(inspect.getattr_static(virtual.Channel, "qos").fget), broke(
        "kombu.transport.virtual.Channel._qos", ("kombu",), ours,
        "The qos property no longer caches its QoS in _qos: reading it would build one on a closed channel.")
    payload = {"body": "", "properties": {"delivery_tag": "tag-9", "delivery_info": {}}, "headers": {}}
    assert virtual.Message(payload, channel=None)._raw is payload, broke(
        "kombu.transport.virtual.Message._raw", ("kombu",), ours,
        "The message no longer keeps its raw payload: hand_back_unsure cannot rebuild its unacked record.")

