"""pytest-benchmark over the ops and providers of ``python -m bench``: one forward + backward of each provider at
the first point of the op's suite, grouped by op and shape (``python -m pytest bench/ --benchmark-only``)."""

import contextlib

import pytest
import torch

from bench.runner import CALIBRL, COMPILED, COMPILED_CALIBRL, DTYPES, EAGER, LIGER, all_ops, providers

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the bench extra) to run bench/")
CPU, PROVIDERS = torch.device("cpu"), (CALIBRL, EAGER, COMPILED, COMPILED_CALIBRL, LIGER)


def pytest_generate_tests(metafunc):
    part = metafunc.config.getoption("--bench-sizes")
    cases = [(op, op.sweeps[part][0], p) for op in all_ops().values() if op.differentiable for p in PROVIDERS]
    cases = [(op, sweep, p) for op, sweep, p in cases if p != LIGER or op.liger is not None]
    metafunc.parametrize("case", cases, ids=[f"{op.name}-{provider}" for op, _, provider in cases])


def test_forward_backward(benchmark, case):
    op, sweep, provider = case
    dims = next(sweep.points())
    torch.manual_seed(0)
    inputs = op.build(dims, DTYPES[sweep.dtype], CPU)  # the same inputs for every provider of a shape
    forwards, contexts, skipped = providers(op, inputs, CPU, compiled=provider in (COMPILED, COMPILED_CALIBRL))
    if provider in skipped:
        pytest.skip(skipped[provider])
    forward, grads = forwards[provider]
    benchmark.group = f"{op.name} " + ", ".join(f"{k} {v}" for k, v in dims.items()) + f" {sweep.dtype} full"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads(), **dims)
    call = lambda: torch.autograd.grad(forward(), grads)
    with contexts.get(provider, contextlib.nullcontext)():
        result = benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    assert len(result) == len(grads) and all(torch.isfinite(g).all() for g in result)
