"""pytest-benchmark entry point: the kernels' workloads per provider, for regression tracking.

    python -m pytest bench/ --benchmark-only                          # the `cpu` size set (minutes)
    python -m pytest bench/ --benchmark-only --benchmark-autosave     # keep the run in .benchmarks/
    python -m pytest bench/ --benchmark-only --benchmark-compare      # against the last saved run
    python -m pytest bench/ --benchmark-only --bench-sizes tiny       # seconds: the plumbing only

Each benchmark is one forward + backward (``torch.autograd.grad``) of one provider at one shape, built
from the same ``bench.workloads`` as ``python -m bench.run``; pytest-benchmark groups them by kernel and
shape, so the providers of a shape sit side by side in its table, and ``extra_info`` records the shape's
floor (6 N D V flops over the square GEMM rate for the lm_head loss). This complements ``bench.run``
rather than replacing it: pytest-benchmark times one benchmark after another, while ``bench.run``
interleaves providers round by round (the ratios it reports stay fair on a shared, noisy machine) and
measures memory. Not part of the README's test command (``testpaths`` is ``tests/``).
"""

from __future__ import annotations

import time
from typing import Dict, List, Tuple

import pytest
import torch

from bench.providers import CALIBRL, COMPILED, EAGER, LIGER, provider_from_name
from bench.run import make_call
from bench.workloads import WORKLOADS, Point, Rates, Unavailable

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the bench extra) to run bench/")

PROVIDERS = (CALIBRL, EAGER, COMPILED, LIGER)
_LINEAR, _LOGITS, _TOKENS = "fused_linear_calibrl_loss", "fused_calibrl_loss", "token_logprobs"

# Size sets: (kernel, dims, rounds). `cpu` holds the README's CPU target shapes.
SIZES: Dict[str, List[Tuple[str, Tuple[Tuple[str, int], ...], int]]] = {
    "tiny": [
        (_LINEAR, (("N", 16), ("D", 16), ("V", 96)), 3),
        (_LOGITS, (("N", 16), ("V", 96)), 3),
        (_TOKENS, (("N", 16), ("V", 96)), 3),
    ],
    "cpu": [
        (_LINEAR, (("N", 2048), ("D", 512), ("V", 32000)), 5),
        (_LINEAR, (("N", 1024), ("D", 896), ("V", 151936)), 3),
        (_LOGITS, (("N", 2048), ("V", 32000)), 5),
        (_TOKENS, (("N", 2048), ("V", 32000)), 5),
    ],
}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    sizes = metafunc.config.getoption("--bench-sizes")
    if sizes not in SIZES:
        raise pytest.UsageError(f"--bench-sizes: expected one of {sorted(SIZES)}, got {sizes!r}")
    # Liger has a CPU path only for the lm_head loss (its logits kernels are Triton, CUDA only).
    cases = [(kernel, dims, rounds, provider) for kernel, dims, rounds in SIZES[sizes] for provider in PROVIDERS
             if provider != LIGER or kernel == _LINEAR]
    ids = [f"{kernel}-{'-'.join(f'{k}{v}' for k, v in dims)}-{provider}" for kernel, dims, _, provider in cases]
    metafunc.parametrize("case", cases, ids=ids)


_INPUTS: Dict[Tuple[str, tuple], Dict[str, torch.Tensor]] = {}  # one input set per shape, shared by providers
_RATES: List[Rates] = []


def _inputs(point: Point) -> Dict[str, torch.Tensor]:
    key = (point.kernel, point.dims)
    if key not in _INPUTS:
        _INPUTS.clear()  # shapes run one after another: keep one input set alive
        _INPUTS[key] = WORKLOADS[point.kernel].build(point, torch.device("cpu"))
    return _INPUTS[key]


def _machine_rates(size: int = 2048, copy_bytes: int = 256 << 20) -> Rates:
    """fp32 FLOP/s of a size^3 torch.mm and bytes/s of a copy (best of three each), once per session."""
    if not _RATES:
        a, b = torch.randn(size, size), torch.randn(size, size)
        src, dst = torch.empty(copy_bytes // 4), torch.empty(copy_bytes // 4)
        gemm = copy = float("inf")
        for _ in range(4):  # the first round warms up
            start = time.perf_counter()
            torch.mm(a, b)
            middle = time.perf_counter()
            dst.copy_(src)
            end = time.perf_counter()
            gemm, copy = min(gemm, middle - start), min(copy, end - middle)
        _RATES.append(Rates(gemm_flops={"float32": 2 * size**3 / gemm}, copy_bytes_per_s=2 * copy_bytes / copy))
    return _RATES[0]


def test_forward_backward(benchmark, case):
    kernel, dims, rounds, provider_name = case
    point = Point(kernel, "N", dims, "float32")
    workload = WORKLOADS[kernel]
    inputs = _inputs(point)
    try:
        forward, grad_tensors = make_call(workload, provider_from_name(provider_name, kernel, torch.device("cpu")),
                                          inputs, torch.device("cpu"))
    except Unavailable as reason:
        pytest.skip(f"{provider_name}: {reason}")

    def step():
        return torch.autograd.grad(forward(), grad_tensors)

    benchmark.group = f"{kernel} " + ", ".join(f"{key} {value}" for key, value in dims) + " fp32 forward+backward"
    rates = _machine_rates()
    floor_s = workload.roofline_seconds(point, "full", rates)
    benchmark.extra_info.update(provider=provider_name, floor_s=floor_s, floor=workload.floor_kind,
                                square_gemm_gflops=round(rates.gemm_flops["float32"] / 1e9, 1),
                                copy_gb_per_s=round(rates.copy_bytes_per_s / 1e9, 1), threads=torch.get_num_threads(),
                                **dict(dims))
    grads = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert len(grads) == len(grad_tensors) and all(torch.isfinite(g).all() for g in grads)
