"""Locustfile: steady traffic with out-of-distribution images mixed in."""

from load_tests.users import AnomalousUser  # noqa: F401
