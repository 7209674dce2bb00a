"""Benchmarks of celery-forwarder (not part of ``make test``): pools, overhead vs bare Celery, memory soak.

Run ``python -m bench.run [--only pools|overhead|soak] [--quick]``; see bench/README.md.
"""
