"""Locustfile: steady traffic (see :class:`load_tests.users.SteadyUser`)."""

from load_tests.users import SteadyUser  # noqa: F401  (locust collects User classes from this module)
