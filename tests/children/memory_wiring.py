"""Child of test_memory_debug: the worker's own extension wiring, in a fresh interpreter; prints what started."""

import json, os, sys, threading
from forwarder.pool_bootstrap import bootstrap
bootstrap()
from celery import signals
from forwarder.app import build_app
from forwarder.extensions import default_extensions
from forwarder.settings import Settings
settings = Settings.from_env(os.environ)
default_extensions().install(build_app(settings), settings)
signals.worker_init.send(sender=None)
signals.worker_process_init.send(sender=None)
tracemalloc = sys.modules.get("tracemalloc")
print(json.dumps({
    "tracemalloc_imported": tracemalloc is not None,
    "tracing": bool(tracemalloc and tracemalloc.is_tracing()),
    "memory_module": "forwarder.memory" in sys.modules,
    "threads": sorted(t.name for t in threading.enumerate()),
    "usr2_handler": str(__import__("signal").getsignal(__import__("signal").SIGUSR2)),
}))
