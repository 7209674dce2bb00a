"""Child of test_entrypoint: installs an import hook, runs the real entry point (check), imports the whole worker;
exits 0 only if socket and ssl were patched before any network library was imported."""

import runpy, sys
WATCHED = ("celery", "kombu", "redis", "requests", "urllib3", "boto3", "botocore", "ssl")
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        root = name.split(".")[0]
        if root in WATCHED and root not in seen:
            monkey = sys.modules.get("gevent.monkey")
            seen[root] = bool(monkey and monkey.is_module_patched("socket"))
        return None

sys.meta_path.insert(0, Watch())
sys.argv = ["forwarder", "check"]
try:
    runpy.run_module("forwarder", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
import forwarder.worker, forwarder.app, forwarder.tasks, gateways.cached_client  # noqa
import boto3, requests  # noqa
from gevent import monkey
assert monkey.is_module_patched("socket") and monkey.is_module_patched("ssl"), "not patched"
late = [name for name, patched in seen.items() if not patched]
assert not late, f"imported before the gevent patch: {late}"
assert {"celery", "requests", "boto3"} <= set(seen), seen
print("patched first:", sorted(seen))
