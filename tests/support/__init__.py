"""Helpers shared by the unit and integration tests (harnesses, tiny models, fault load)."""
