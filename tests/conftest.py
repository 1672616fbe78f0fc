"""Test setup: Triton kernels run under the interpreter on CPU-only machines; `gpu` tests need CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit is decorated, i.e. before fxopt.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    # `slow` tests (bigger fuzz budgets, the full architecture matrix) run only when asked: -m slow or FXOPT_SLOW=1
    if "slow" not in (config.getoption("markexpr") or "") and os.environ.get("FXOPT_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow or FXOPT_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_fallback():
    """Fail the test if any fxopt kernel fell back to its reference (a test of a kernel must run the kernel)."""
    from fxopt.report import RUNTIME_FALLBACKS
    n = len(RUNTIME_FALLBACKS)
    yield
    assert RUNTIME_FALLBACKS[n:] == [], f"kernel fell back to the reference: {RUNTIME_FALLBACKS[n:]}"


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
