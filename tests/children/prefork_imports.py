"""Child of test_entrypoint: the prefork entry point and the whole worker never import gevent."""

import runpy, sys
sys.argv = ["forwarder", "check"]
try:
    runpy.run_module("forwarder", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
import forwarder.worker, forwarder.app, forwarder.tasks, boto3, requests  # noqa
from celery.concurrency import get_implementation
get_implementation("prefork")
assert "gevent" not in sys.modules, "gevent imported under prefork"
assert "gevent.monkey" not in sys.modules
print("gevent never imported")
