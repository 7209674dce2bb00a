"""Profile a worker under the cost section's load: ``python -m bench.profile [--pool gevent] [--program forwarder]``.

Queues a backlog, starts one worker (the defaults, an agent listening), and samples it with py-spy
(``--py-spy PATH``; py-spy is not a dependency: install it in a venv of its own) for ``--seconds`` while it
works, children included (``--subprocesses``). Writes the collapsed stacks and prints the top functions by
own samples and by inclusive samples, and the share of samples whose innermost frame is the forwarder's own code.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import time
import uuid
from pathlib import Path

from bench.cost import UdpSink
from bench.measure import ROOT, Completions, queue_tasks
from bench.servers import Stack
from bench.workers import BenchWorker, Variant, worker_environment

OURS = ("forwarder/", "gateways/")


def top(stacks: Path, limit: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = ours = 0
    for line in stacks.read_text().splitlines():
        frames, _, count_text = line.rpartition(" ")
        count = int(count_text)
        names = frames.split(";")
        total += count
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
        if any(part in names[-1] for part in OURS):
            ours += count
    lines = [f"{total} samples; own time in forwarder/ or gateways/ code: {ours / max(total, 1):.1%}", "", "own:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(limit)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(limit * 2)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--pool", default="gevent", choices=("gevent", "prefork"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--program", default="forwarder", choices=("forwarder", "bare"))
    parser.add_argument("--model-delay", type=float, default=0.05)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Stack() as stack:
        sink = UdpSink()
        url = stack.model_url(args.model_delay)
        queue = f"profile-{uuid.uuid4().hex[:8]}"
        queue_tasks(stack, queue, args.tasks)
        variant = Variant("profile", program=args.program, pool=args.pool, concurrency=args.concurrency,
                          env={"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(sink.port)})
        completions = Completions(f"{stack.redis.url}/1")
        worker = BenchWorker(worker_environment(stack, variant, queue, url), args.program).start(timeout=90)
        try:
            while completions.count < args.tasks // 10:
                time.sleep(0.05)
            stacks = out / f"{args.program}-{args.pool}-{args.concurrency}.txt"
            done = completions.count
            subprocess.run([args.py_spy, "record", "-p", str(worker.pid), "-d", str(args.seconds), "-r", "250",
                            "-f", "raw", "-o", str(stacks), "--nonblocking", "--subprocesses"],
                           check=True, capture_output=True)
            print(f"{completions.count - done} tasks in {args.seconds} s while sampled")
        finally:
            worker.kill()
            completions.close()
            sink.close()
        report = top(stacks)
        (out / f"{stacks.stem}.top.txt").write_text(report)
        print(report)


if __name__ == "__main__":
    main()
