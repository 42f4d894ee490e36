"""Fixtures shared by the kernel tests (the ``backend`` fixture lives in tests/conftest.py)."""

import pytest


@pytest.fixture
def force_triton(monkeypatch):
    """Runs the test on the Triton kernels (CALIBRL_IMPL=triton; under the interpreter on CPU tensors)."""
    monkeypatch.setenv("CALIBRL_IMPL", "triton")
