"""The worker's task path in this process, for fast tests: no Redis, no model server, no worker.

What a prefork child or a gevent greenlet runs per message is Celery's tracer (``build_tracer(eager=False)``)
over the task ``build_app`` registers, with the deps ``deps.build_deps`` builds. Here it runs in process:

- the model answers through a requests transport adapter mounted on the real ``ModelClient``'s session (every
  byte of its answer goes through ``ModelClient.predict``), or fails as the transport would;
- the result store is the real backend of the app (``forwarder.result_backends.RedisResults``: its encoding,
  its read-before-write, llm-engine's meta), with its Redis replaced by a dict at the backend's get/set;
- the callbacks are recorded at ``CallbackClient.send`` (the body the callback hook hands over for delivery);
- the extensions' ``task_done`` is connected to Celery's ``task_postrun`` for the run only (the worker
  connects it once per process, in ``Extensions.install``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from celery import Celery, signals
from celery.app.trace import build_tracer
from requests.adapters import BaseAdapter, HTTPAdapter
from urllib3.response import HTTPResponse

from forwarder import deps
from forwarder.app import build_app
from forwarder.extensions import Extension, Extensions
from forwarder.settings import Settings
from gateways.cached_client import CachedClient

#: What the model does with one request: ``(status, body)`` to answer, or an exception to raise (as the
#: transport raises ``requests.ConnectionError``).
Answer = Callable[[requests.PreparedRequest], "tuple[int, bytes] | BaseException"]


class ModelTransport(BaseAdapter):
    """A requests adapter that answers as ``answer`` says; the health check (GET) answers 200."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.posts = 0

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        outcome: tuple[int, bytes] | BaseException = (200, b"{}")
        if request.method == "POST":
            self.posts += 1
            outcome = self.answer(request)
        if isinstance(outcome, BaseException):
            raise outcome
        status, body = outcome
        raw = HTTPResponse(body=io.BytesIO(body), status=status, preload_content=False,
                           headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
        return HTTPAdapter().build_response(request, raw)

    def close(self) -> None:
        pass


class InProcess:
    """A forwarder's app and deps in this process; ``run`` one task, read its stored meta and the callbacks."""

    def __init__(self, settings: Settings, answer: Answer,
                 extensions: list[Extension] | Callable[[deps.Deps], list[Extension]]) -> None:
        self.settings = settings
        self.app: Celery = build_app(settings)
        built = deps.build_deps(settings)
        self.transport = ModelTransport(answer)
        session = requests.Session()
        session.mount("http://", self.transport)
        session.mount("https://", self.transport)
        built.model.session = CachedClient("model-http-session", lambda: (session, None))
        # A callable gets the built deps: an extension observes the hooks and outage it is handed (as in build_deps).
        self.extensions = Extensions(extensions(built) if callable(extensions) else extensions)
        self.deps = dataclasses.replace(built, extensions=self.extensions)
        self.store: dict[str, bytes] = {}
        self.callbacks: list[tuple[str, dict[str, Any]]] = []
        for hook in built.hooks.hooks:
            client = getattr(hook, "client", None)
            if client is not None:
                client.send = self._record_callback
        backend = self.app.backend
        backend.get = self.store.get  # type: ignore[method-assign]
        backend.set = self._set  # type: ignore[method-assign]
        backend.delete = self.store.pop  # type: ignore[method-assign]
        backend.mget = lambda keys: [self.store.get(key) for key in keys]  # type: ignore[method-assign]

    def _set(self, key: Any, value: Any, **_: Any) -> None:
        self.store[key.decode() if isinstance(key, bytes) else key] = value

    def _record_callback(self, url: str, body: dict[str, Any], auth: Any, webhook_id: str = "") -> None:
        if "fail" in url:
            from gateways.callback import CallbackError

            raise CallbackError("receiver answered HTTP 500", attempts=1, status_code=500)
        self.callbacks.append((url, json.loads(json.dumps(body))))  # what goes on the wire, as JSON

    def run(self, request: Any, arrival: Any = None, task_name: str | None = None, retries: int = 0,
            task_id: str | None = None) -> dict[str, Any]:
        """Run one message as a worker runs it; returns the meta stored for it (as JSON, raw)."""
        from forwarder.tasks import TASK_NAME

        task = self.app.tasks[task_name or TASK_NAME]
        tracer = build_tracer(task.name, task, app=self.app, eager=False, propagate=False)
        task_id = task_id or str(uuid.uuid4())
        message = {"id": task_id, "retries": retries,
                   "delivery_info": {"routing_key": self.settings.queue, "exchange": "", "priority": 0,
                                     "redelivered": False}}
        tracer(task_id, [request, arrival, False], {}, message)
        raw = self.store.get(self.app.backend.get_key_for_task(task_id).decode())
        assert raw is not None, f"no result stored for {task_id}"
        return json.loads(raw)


@contextmanager
def in_process(env: dict[str, str], answer: Answer,  # type: ignore[assignment]
               extensions: list[Extension] | Callable[[deps.Deps], list[Extension]] = ()) -> Iterator[InProcess]:
    """``InProcess`` for ``env``, its deps installed (the previous ones put back after)."""
    from forwarder.extensions.redelivery import messages_restored
    from forwarder.model_outage import outage_changed

    settings = Settings.from_env(env)
    forwarder = InProcess(settings, answer, extensions if callable(extensions) else list(extensions))
    previous = deps._current
    # What the extensions' installs connect (the worker does it once per process): put back after the run, so
    # no later test's extension is shadowed by one of this run's (a receiver with the same dispatch_uid).
    connected = {signal: list(signal.receivers) for signal in (messages_restored, outage_changed)}
    deps.install(forwarder.deps)
    for extension in forwarder.extensions:
        extension.install(forwarder.app, settings)
    uid = f"tests.inprocess.{id(forwarder)}"
    signals.task_postrun.connect(forwarder.extensions._task_postrun, weak=False, dispatch_uid=uid)
    try:
        yield forwarder
    finally:
        signals.task_postrun.disconnect(dispatch_uid=uid)
        for signal, receivers in connected.items():
            signal.receivers[:] = receivers
            signal.sender_receivers_cache.clear()
        deps._current = previous
