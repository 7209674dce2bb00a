# celery-forwarder: the worker container of an async-inference pod.
# Build: docker build -t celery-forwarder .   Run: configured only through environment variables.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # A precaution, not a measured fix: glibc makes up to 8 malloc arenas per core for threads that
    # allocate concurrently (gevent's DNS pool, ddtrace's writer, the memory-debug thread); two bound
    # that. bench/README.md measured no effect either way on the soak, nor a gain from jemalloc.
    MALLOC_ARENA_MAX=2

# libcurl for pycurl (kombu's SQS transport under prefork); tini reaps children and forwards SIGTERM.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcurl4 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY forwarder ./forwarder
COPY gateways ./gateways

RUN useradd --system --uid 10001 --home-dir /app forwarder
USER forwarder

ENTRYPOINT ["tini", "--", "ddtrace-run", "python", "-m", "forwarder"]
