"""Child of test_task_frames: runs tasks through Celery's own tracer, then reports frames and cycles kept.

Reads the cases (JSON) on stdin; exits 3 if a frame of ours or too much cyclic garbage outlived the tasks.
"""

import dataclasses, gc, json, os, sys, types, uuid
from forwarder.pool_bootstrap import bootstrap
bootstrap()  # the gevent patch first, as in the worker
from pathlib import Path
from celery.app.trace import build_tracer
import forwarder, gateways
from forwarder import deps
from forwarder.app import build_app
from forwarder.settings import Settings

OURS = tuple(str(Path(module.__file__).parent) + os.sep for module in (forwarder, gateways))
settings = Settings.from_env(os.environ)
app = build_app(settings)
cases = json.load(sys.stdin)
# The worker's deps, built once as in a worker process: one hook runner (one Firehose gateway) for
# all cases, and a model client per model server the cases use.
shared = deps.build_deps(settings)
shared.extensions.install(app, settings)  # as the worker does: ReleaseExceptions among them
per_model = {case["model"]: dataclasses.replace(shared, model=deps.build_deps(
    settings.replace(model_url=case["model"])).model) for case in cases}

def run(case):
    deps.install(per_model[case["model"]])
    task = app.tasks[case["task"]]
    tracer = build_tracer(task.name, task, app=app, eager=False, propagate=False)
    task_id = str(uuid.uuid4())
    request = {"id": task_id, "retries": case.get("retries", 0),
               "delivery_info": {"routing_key": settings.queue, "exchange": "", "priority": 0}}
    tracer(task_id, [case["request"], None, False], {}, request)
    return task.backend.get_task_meta(task_id)["status"]

def frames_of_ours():
    return [o for o in gc.get_objects()
            if isinstance(o, types.FrameType) and o.f_code.co_filename.startswith(OURS)]

import tracemalloc
strict = os.environ["FRAME_CHECK"] == "strict"
if strict:
    run(cases[0])  # warm-up: the process's clients (Firehose, Redis, HTTP) are built once, not per task
gc.collect()
gc.disable()  # strict: a frame in a reference cycle counts as kept, too
tracemalloc.start()
held_on_purpose = []
for case in cases:
    status = run(case)
    print(case["name"], status)
    assert status == case["status"], (case["name"], status)
    if case.get("keep_exception"):  # the control: what a cache of exceptions would do
        try:
            deps.current().model.predict({"id": "control"})
        except Exception as exc:
            held_on_purpose.append(exc)
if not strict:
    gc.collect()
found = [frame for frame in frames_of_ours() if frame.f_locals or not strict]
for frame in found:
    print("kept alive:", frame.f_code.co_name, Path(frame.f_code.co_filename).name, frame.f_lineno,
          sorted(frame.f_locals))
kept, found, frame = bool(found), None, None  # hold no frame while measuring
# strict: what only the cyclic collector would have freed (requests or answers waiting in cycles).
held = tracemalloc.get_traced_memory()[0]
gc.collect()
in_cycles = held - tracemalloc.get_traced_memory()[0]
limit = int(os.environ["FRAME_CYCLES_LIMIT"])
if strict and in_cycles > limit:
    print(f"in reference cycles: {in_cycles} bytes (limit {limit})")
sys.exit(3 if kept or (strict and in_cycles > limit) else 0)
