"""Test-wide setup.

Without a GPU, Triton kernels are tested on CPU tensors by Triton's interpreter, which must be
switched on before triton is first imported; so this happens here, before any test module loads.
On a CUDA machine the kernels run natively (set TRITON_INTERPRET=1 yourself to force the interpreter).
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device():
    """Where Triton kernels run in this session: cuda natively, else cpu under the interpreter."""
    if HAS_CUDA and not INTERPRETING:
        return torch.device("cuda")
    if INTERPRETING:
        return torch.device("cpu")
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


BACKENDS = ("torch", "cpp", "triton")  # every implementation of the ops that runs on CPU tensors


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each CPU-capable backend in turn, forced through CALIBRL_IMPL; an unavailable one fails the test."""
    from calibrl_kernels import _dispatch

    ok, reason = _dispatch.availability(request.param, torch.device("cpu"))
    if not ok:
        pytest.fail(f"backend {request.param} unavailable: {reason}")
    monkeypatch.setenv("CALIBRL_IMPL", request.param)
    return request.param
