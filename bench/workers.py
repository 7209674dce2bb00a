"""Bench workers: the worker variants measured, how each is launched and its environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

from bench.servers import Stack
from devtools.servers import WorkerProcess, worker_env

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
#: Environment a bench worker must not inherit from the shell running the bench.
SCRUBBED = ("MALLOC_ARENA_MAX", "LD_PRELOAD", "PYTHONTRACEMALLOC", "FORWARDER_MEMORY_DEBUG", "FORWARDER_HOOKS",
            "CELERY_WORKER_PREFETCH_MULTIPLIER", "CELERY_WORKER_MAX_TASKS_PER_CHILD", "CELERY_WORKER_MAX_MEMORY_PER_CHILD")


@dataclass(frozen=True)
class Variant:
    """One worker configuration: which program, pool, concurrency, hooks, extra environment, under ddtrace-run or not."""

    label: str
    program: str = "forwarder"  # forwarder | bare | leaky
    pool: str = "prefork"
    concurrency: int = 4
    hooks: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    ddtrace: bool = False  # the production launch: ddtrace-run, tracing on, spans sent to the bench's agent


class BenchWorker(WorkerProcess):
    """A worker launched like production, running the forwarder or one of the bench-only programs."""

    MODULES = {"forwarder": "forwarder", "bare": "bench.bare_worker", "leaky": "bench.leaky_worker"}
    READY = {"forwarder": "forwarder ready", "bare": "bare worker ready", "leaky": "forwarder ready"}

    def __init__(self, env: dict[str, str], program: str, *, ddtrace: bool = False) -> None:
        super().__init__(env, ddtrace=ddtrace)
        self.program = program
        #: At WARNING the ready line (INFO) never comes: the caller times from the completions alone.
        self.quiet = env.get("CELERY_LOG_LEVEL") in ("WARNING", "ERROR")

    def command(self) -> list[str]:
        """WorkerProcess's command (``ddtrace-run`` in front when asked) with this program's module."""
        command = super().command()
        command[command.index("-m") + 1] = self.MODULES[self.program]
        if self.env.get("BENCH_CWD"):  # ``python -m`` imports from its working directory first
            command = ["env", "-C", self.env["BENCH_CWD"], *command]
        return command

    def start(self, wait_ready: bool = True, timeout: float = 60) -> BenchWorker:
        super().start(wait_ready=False)
        if wait_ready and not self.quiet:
            self.wait_for_log(self.READY[self.program], timeout)
        return self

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.pid), *self.children()]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> float:
        """RSS in MB summed over the worker's processes (cheap: /proc/<pid>/statm)."""
        total = 0.0
        for process in self.processes():
            try:
                total += process.memory_info().rss / 1e6
            except psutil.NoSuchProcess:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


def worker_environment(stack: Stack, variant: Variant, queue: str, model_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith(("AWS_", "FIREHOSE_"))}
    env = worker_env(
        base,
        CELERY_WORKER_POOL=variant.pool,
        CELERY_BROKER_URL=f"{stack.redis.url}/0",
        CELERY_RESULT_BACKEND=f"{stack.redis.url}/1",
        CELERY_QUEUE=queue,
        CELERY_WORKER_CONCURRENCY=str(variant.concurrency),
        FORWARDER_MODEL_URL=f"{model_url}/predict",
        FORWARDER_HEALTHCHECK_URL=f"{model_url}/readyz",
        FORWARDER_READY_TIMEOUT="30",
        **stack.aws_env(),
    )
    if variant.ddtrace:
        env.update(stack.trace_env())
    if variant.hooks:
        env["FORWARDER_HOOKS"] = ",".join(variant.hooks)
    if "logging" in variant.hooks:
        env.update(FIREHOSE_STREAM_NAME=stack.stream, FORWARDER_ENDPOINT_NAME="bench", FORWARDER_ENDPOINT_ID="end_bench")
    if "callback" in variant.hooks:
        env.update(
            FORWARDER_CALLBACK_URL=f"{stack.receiver.url}/callback",
            FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        )
    env.update(variant.env)
    return env


#: The overhead comparison: the forwarder, a bare Celery worker with Celery's defaults, and the same bare
#: worker with the two settings llm-engine's protocol needs (STARTED state, ack after the result).
OVERHEAD_PROGRAMS = (
    ("forwarder", "forwarder", {}),
    ("bare", "bare", {}),
    ("bare-protocol", "bare", {"BARE_MIRROR": "track_started,acks_late"}),
)
