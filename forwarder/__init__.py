"""celery-forwarder: a Celery worker that forwards task payloads to a model HTTP server.

The package reads as the pipeline: settings -> app -> tasks -> hooks -> extensions, over ``gateways``
(docs/ARCHITECTURE.md).

Kept import-free on purpose: ``python -m forwarder`` imports this package before ``__main__``,
and under the gevent pool nothing may import sockets before ``gevent.monkey.patch_all()`` runs.

``__version__`` is the project's only version: pyproject.toml reads it (``tool.setuptools.dynamic``), and
``--version`` prints it.
"""

__version__ = "0.1.0"
