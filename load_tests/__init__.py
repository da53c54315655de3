"""Load scenarios (locust over gRPC) against a running explainserve gateway.

Run one with ``python -m load_tests.run <scenario>``; see :mod:`load_tests.run`.
"""
