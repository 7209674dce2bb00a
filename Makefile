# celery-forwarder: `make demo` runs the worker on embedded servers, `make test` runs the suite.
# Both create .venv from the lock files on a fresh machine by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help demo test test-fast matrix lint lock bench cost soak scale sizing capacity outage clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)  ## run the whole flow locally (prefork); POOL=gevent for the gevent pool
	$(PY) -m devtools.demo --pool $(or $(POOL),prefork)

test: $(STAMP) lint  ## lint, then the whole test suite against real local servers
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the in-process half of the suite (no server, no worker), in seconds
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# uv from PATH, else one of its own in .matrix/tool (pip-installed once).
UV ?= $(or $(shell command -v uv 2>/dev/null),.matrix/tool/bin/uv)

.matrix/tool/bin/uv:
	$(PYTHON) -m venv .matrix/tool
	.matrix/tool/bin/pip install -q --disable-pip-version-check uv

matrix: $(STAMP) $(UV)  ## test-fast + a real worker per pool on the oldest and newest deps pyproject allows, ~5 min (not in `test`)
	$(PY) -m devtools.matrix --uv $(UV) $(MATRIX_ARGS)

lint: $(STAMP)  ## ruff (incl. B019: no lru_cache on methods), then mypy on forwarder, gateways and devtools
	$(VENV)/bin/ruff check forwarder gateways devtools tests bench
	$(VENV)/bin/mypy

lock: $(STAMP)  ## regenerate requirements.txt and requirements-dev.txt from the .in files
	$(VENV)/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links -o requirements.txt requirements.in
	$(VENV)/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links -o requirements-dev.txt requirements-dev.in

bench: $(STAMP)  ## pools, overhead and cost benchmarks, 18-25 min (JSON + PNG under bench/results/)
	$(PY) -m bench.run --only pools --only overhead --only cost $(BENCH_ARGS)

cost: $(STAMP)  ## what each part costs a task against bare Celery, both pools, ~10 min
	$(PY) -m bench.run --only cost $(BENCH_ARGS)

soak: $(STAMP)  ## the 20,000-task memory soak with its negative controls, 11-25 min
	$(PY) -m bench.run --only soak $(BENCH_ARGS)

scale: $(STAMP)  ## gevent at concurrency 32-1024 against a 1 s model (prefork 32/64 for memory), ~5 min
	$(PY) -m bench.run --only scale $(BENCH_ARGS)

sizing: $(STAMP)  ## what a pod needs: memory (MiB) and start-up, prefork/gevent, with and without ddtrace-run, ~2-4 min
	$(PY) -m bench.run --only sizing $(BENCH_ARGS)

outage: $(STAMP)  ## the model SIGKILLed for 2 min under load: this worker beside llm-engine's retries, both pools, ~7 min
	$(PY) -m bench.outage $(OUTAGE_ARGS)

capacity: $(STAMP)  ## simulate KEDA scaling on queue depth, seconds; writes bench/results/local/ (untracked)
	$(PY) -m bench.capacity --out bench/results/local $(CAPACITY_ARGS)

clean:  ## remove the virtualenvs (.venv, .matrix) and caches
	rm -rf $(VENV) .matrix .ruff_cache .pytest_cache .mypy_cache
