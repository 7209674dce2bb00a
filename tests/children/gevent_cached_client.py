"""Child of test_cached_client: 50 greenlets ask a cold CachedClient at once; exit 0 only if exactly one build ran."""

from gevent import monkey
monkey.patch_all()

import sys
import time
from datetime import UTC, datetime, timedelta

import gevent
import gevent.event

from gateways.cached_client import CachedClient

calls = []

def build():
    calls.append(1)
    time.sleep(0.3)  # patched: yields to the other greenlets while "calling STS"
    return object(), datetime.now(UTC) + timedelta(hours=1)

cache = CachedClient("gevent-test", build, leeway=timedelta(minutes=10))
go = gevent.event.Event()

def call():
    go.wait()
    return cache.get()

greenlets = [gevent.spawn(call) for _ in range(50)]
gevent.sleep(0)
go.set()
gevent.joinall(greenlets, timeout=20, raise_error=True)
clients = {id(g.value) for g in greenlets}
if not monkey.is_module_patched("threading"):
    sys.exit(3)
if len(calls) != 1 or cache.builds != 1:
    sys.exit(4)
if len(clients) != 1 or not all(g.successful() for g in greenlets):
    sys.exit(5)
