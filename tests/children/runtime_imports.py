"""Child of test_architecture: import every runtime module as the image would, with only requirements.txt.

A meta-path finder makes every top-level module absent unless it is the standard library, the runtime
packages (forwarder, gateways) or part of a distribution pinned in requirements.txt: what a venv built
from requirements.txt alone would hold. Optional imports then fall back as they would there; a hard import
of anything else fails. Prints JSON: the modules imported, the distributions they came from, and what was
refused.
"""

import importlib
import importlib.machinery
import importlib.metadata
import json
import pkgutil
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("forwarder", "gateways")
def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


pinned = {
    normalize(re.split(r"[=<>\[ ;]", line.strip(), maxsplit=1)[0])
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
}
owners = importlib.metadata.packages_distributions()  # top-level module -> distributions
refused: set[str] = set()
used: set[str] = set()


def allowed(top: str) -> bool:
    if top in sys.stdlib_module_names or top in RUNTIME or top in sys.builtin_module_names:
        return True
    dists = {normalize(name) for name in owners.get(top, [])}
    if dists & pinned:
        used.update(dists & pinned)
        return True
    return False


SITE = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def installed(name: str) -> bool:
    """Whether a top-level module would come from site-packages (not the standard library)."""
    spec = importlib.machinery.PathFinder.find_spec(name)
    origin = (spec.origin or "") if spec else ""
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any(str(place).startswith(SITE) for place in [origin, *locations])


class OnlyRuntimeRequirements:
    def find_spec(self, name, path=None, target=None):
        if "." in name or allowed(name) or not installed(name):
            return None
        refused.add(name)
        raise ModuleNotFoundError(f"No module named {name!r} (not in requirements.txt)", name=name)


sys.meta_path.insert(0, OnlyRuntimeRequirements())
# As ``python -m forwarder`` with the gevent pool: the patch first (it imports gevent).
from forwarder.pool_bootstrap import bootstrap  # noqa: E402

bootstrap({"CELERY_WORKER_POOL": "gevent"})
# What Celery loads by name at run time for the worker's pools, brokers and result backends.
LOADED_BY_NAME = (
    "celery.concurrency.gevent", "celery.concurrency.prefork", "kombu.transport.redis", "kombu.transport.SQS",
    "kombu.asynchronous.http.curl", "celery.backends.redis", "celery.backends.s3",
)
modules = []
for package in RUNTIME:
    root = importlib.import_module(package)
    modules.append(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith("__main__"):
            continue  # the entry point runs the worker when imported
        importlib.import_module(info.name)
        modules.append(info.name)
for name in LOADED_BY_NAME:
    importlib.import_module(name)
    modules.append(name)
for top in {name.partition(".")[0] for name in list(sys.modules)}:
    allowed(top)
print(json.dumps({"modules": modules, "used": sorted(used), "refused": sorted(refused)}))
