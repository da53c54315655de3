"""Locustfile: steady traffic with about 10 % corrupt or oversize requests mixed in."""

from load_tests.users import MalformedUser  # noqa: F401
