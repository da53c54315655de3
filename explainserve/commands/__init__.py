"""Sub-commands of the ``explainserve`` command line (see :mod:`explainserve.cli`)."""
