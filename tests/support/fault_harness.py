"""The serving stack shared by the fault-injection tests (a pytest plugin).

Test modules load it with ``pytest_plugins = ["support.fault_harness"]``, so the session-scoped stack
is started once for every ``test_faults_*`` module. Each test leaves the stack serving (it
restarts what it killed and waits for it).
"""

from __future__ import annotations

import pytest

from support.fault_load import BATCH_SIZE, MAX_BATCH_DELAY_MS
from support.serving_harness import stack_for_module, tiny_image_model


@pytest.fixture(scope="session")
def fault_model():
    return tiny_image_model()


@pytest.fixture(scope="session")
def fault_stack(request, tmp_path_factory, fault_model):
    """TorchServe (batch size 4, 50 ms batch delay) and the gateway, shared by the fault tests."""
    yield from stack_for_module(request, tmp_path_factory.mktemp("faults"), [fault_model],
                                batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS)
