"""The C++/OpenMP CPU backend (calibrl_kernels.cpu) against the reference.

The extension is built once per test session (build.extension() caches it; ~30 s the first time on a
2-core machine, a cached load afterwards). Its linear-path row math is also covered by test_chunked.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from _cpu_helpers import (
    CONFIGS,
    assert_loss_outputs_close,
    batch_with_ties,
    cpp_module_or_skip,
    make_batch,
    max_rel_error,
    simulate_build_failure,
)

from calibrl_kernels import _dispatch, cpu, ops, reference
from calibrl_kernels.config import CalibRLConfig
from calibrl_kernels.cpu import build
from calibrl_kernels.reference import coefficients

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cpp():
    return cpp_module_or_skip()


def _logits(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _logprob_grads(fn, logits, targets, temperature, ignore_index=-100):
    logits = logits.detach().requires_grad_(True)
    logp, ent = fn(logits, targets, temperature, ignore_index, True)
    g = torch.Generator().manual_seed(2)
    w_lp = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
    w_h = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
    (grad,) = torch.autograd.grad((logp * w_lp).sum() + (ent * w_h).sum(), (logits,))
    return logp, ent, grad


def _check_against_exact(fn, logits, targets, temperature, ignore_index=-100):
    """Our error vs the fp64 result is at most twice the reference's in the same dtype (+ a small tolerance)."""
    exact = _logprob_grads(reference.token_logprobs, logits.to(torch.float64), targets, temperature, ignore_index)
    ref = _logprob_grads(reference.token_logprobs, logits, targets, temperature, ignore_index)
    ours = _logprob_grads(fn, logits, targets, temperature, ignore_index)
    tol = 1e-12 if logits.dtype == torch.float64 else 2e-6
    for got, base, want, name in zip(ours, ref, exact, ("logp", "entropy", "grad")):
        assert got.dtype == base.dtype and got.shape == base.shape, name
        assert max_rel_error(got, want) <= 2 * max_rel_error(base, want) + tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_token_logprobs_against_reference(cpp, dtype, vocab):
    logits = _logits((3, 2, vocab), dtype, seed=vocab)
    targets = torch.randint(0, vocab, (3, 2), generator=torch.Generator().manual_seed(1))
    targets[1, 0] = -100
    _check_against_exact(cpu.token_logprobs, logits, targets, 0.7)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_token_logprobs_awkward_rows(cpp, temperature):
    """-inf logits (a masked vocabulary), one row whose max grows block after block, a huge logit,
    strided rows (a slice of a wider tensor), N = 1, ignore_index = 3."""
    V = 1500
    wide = _logits((4, V + 5), torch.float32, seed=3)
    wide[0, :700] = float("-inf")
    wide[1] = torch.linspace(-50, 80, V + 5)
    wide[2, 17] = 1e4
    logits = wide[:, 2:-3]
    assert logits.stride(0) == V + 5
    targets = torch.tensor([800, V - 1, 17, 3])
    _check_against_exact(cpu.token_logprobs, logits, targets, temperature, ignore_index=3)
    _check_against_exact(cpu.token_logprobs, logits[:1], targets[:1], temperature)


def test_shifted_logits_are_read_in_place(cpp):
    """logits[:, :-1] of a (B, L, V) tensor (the usual shift by one) is not viewable as (N, V): the kernels
    read its strides instead of copying it."""
    config = CalibRLConfig()
    batch = make_batch(2, 2, 5, config=config, dtype=torch.float32)
    B, T = batch.old_logp.shape
    full = _logits((B, T + 1, 300), torch.float32, seed=8).requires_grad_(True)
    shifted = full[:, :-1]
    assert not shifted.is_contiguous() and cpu._rows.row_view(shifted).data_ptr() == shifted.data_ptr()
    targets = torch.randint(0, 300, (B, T))
    args = (targets, batch.old_logp, batch.advantages, batch.mask)
    ref = reference.fused_calibrl_loss(shifted, *args, **batch.kwargs(config))
    out = cpu.fused_calibrl_loss(shifted, targets, batch.inputs(), config)
    assert_loss_outputs_close(out, ref, rtol=1e-5, atol=1e-6)
    (want,) = torch.autograd.grad(ref.loss, (full,))
    (got,) = torch.autograd.grad(out.loss, (full,))
    assert max_rel_error(got, want) < 1e-5
    _check_against_exact(cpu.token_logprobs, shifted.detach(), targets, 1.0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_calibrl_loss_every_config_fp64(cpp, name):
    config = CONFIGS[name].replace(temperature=1.3 if "luffy" in name else 1.0)
    batch = make_batch(2, 3, 6, config=config, seed=len(name))
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 97), torch.float64, seed=1).requires_grad_(True)
    targets = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(4))
    targets[0, 1] = -100
    args = (logits, targets, batch.old_logp, batch.advantages, batch.mask)
    ref = reference.fused_calibrl_loss(*args, **batch.kwargs(config))
    out = cpu.fused_calibrl_loss(logits, targets, batch.inputs(), config)
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12, what=name)
    (want,) = torch.autograd.grad(ref.loss * 1.5, (logits,))
    (got,) = torch.autograd.grad(out.loss * 1.5, (logits,))
    assert max_rel_error(got, want) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["calibrl", "rlplus-entropy", "calibrl-options"])
def test_fused_calibrl_loss_low_precision(cpp, dtype, name):
    config = CONFIGS[name].replace(temperature=0.7)
    batch = make_batch(2, 2, 5, config=config, dtype=torch.float32, seed=6)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 1037), dtype, seed=2)
    targets = torch.randint(0, 1037, (B, T), generator=torch.Generator().manual_seed(5))
    targets[-1, 0] = -100

    def run(x):
        x = x.detach().requires_grad_(True)
        if run.ours:
            out = cpu.fused_calibrl_loss(x, targets, batch.inputs(), config)
        else:
            out = reference.fused_calibrl_loss(
                x, targets, batch.old_logp, batch.advantages, batch.mask, **batch.kwargs(config)
            )
        return out, torch.autograd.grad(out.loss, (x,))[0]

    run.ours = False
    exact, exact_grad = run(logits.to(torch.float64))
    ref, ref_grad = run(logits)
    run.ours = True
    out, grad = run(logits)
    assert grad.dtype == dtype and out.loss.dtype == torch.float32
    assert_loss_outputs_close(out, exact, rtol=2e-5, atol=2e-6)
    assert max_rel_error(grad, exact_grad) <= 2 * max_rel_error(ref_grad, exact_grad) + 2e-6


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_row_loss_terms_equal_closed_form_with_ties(cpp, name):
    """(b) of row_loss: the C++ per-row terms and coefficients equal coefficients.token_terms on the
    kernel's own lp and H (fp64), with ties planted on those lp (ratio 1, guide z = 0, huber kinks,
    clamp bounds, clipped and dual-clipped ratios)."""
    config = CONFIGS[name]
    batch = make_batch(3, 3, 11, config=config, seed=len(name) + 1)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 53), torch.float64, seed=len(name))
    targets = torch.randint(0, 53, (B * T,), generator=torch.Generator().manual_seed(len(name)))
    targets[5] = -100
    stats = torch.zeros(B * T, len(coefficients.ROW_FIELDS), dtype=torch.float64)
    cpp.row_stats(logits, targets, 1.0, -100, stats)
    batch = batch_with_ties(batch, stats[:, coefficients.ROW["logp"]].view(B, T))
    mask = batch.mask * (targets != -100).view(B, T)
    table = coefficients.token_table(batch.inputs(mask=mask), config, torch.float64)
    rows = torch.zeros_like(stats)
    cpp.row_loss(
        logits, targets, table, rows, config.mode, config.activation, cpu._rows.loss_params(config), 1.0, -100, False
    )
    torch.testing.assert_close(rows[:, :3], stats[:, :3], rtol=0, atol=0)  # logp, entropy, lse
    expected = rows.clone()
    coefficients.fill_row_terms(expected, table, config)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-15)
    assert bool((rows[:, coefficients.ROW["coef_a"]] != 0).any())


def test_same_result_on_one_and_two_threads(cpp):
    batch = make_batch(2, 2, 5, config=CalibRLConfig(), dtype=torch.float32)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 3001), torch.float32).requires_grad_(True)
    targets = torch.randint(0, 3001, (B, T))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = cpu.fused_calibrl_loss(logits, targets, batch.inputs(), CalibRLConfig())
            results.append((out.loss.detach(), torch.autograd.grad(out.loss, (logits,))[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_dispatch_picks_cpp_on_cpu(cpp, monkeypatch):
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    cpu_device = torch.device("cpu")
    for op in ("token_logprobs", "fused_calibrl_loss", "linear_token_logprobs", "fused_linear_calibrl_loss"):
        assert _dispatch.selected_impl(op, cpu_device) == "cpp", op
    assert _dispatch.selected_impl("group_advantages", cpu_device) == "torch"
    ok, reason = cpu.availability(torch.device("meta"))
    assert not ok and "CPU" in reason
    logits = _logits((2, 3, 50), torch.float32).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 3))
    logp = ops.token_logprobs(logits, targets, temperature=1.3)
    torch.testing.assert_close(logp, reference.token_logprobs(logits, targets, 1.3), rtol=1e-5, atol=1e-6)


def _fallback_inputs():
    config = CalibRLConfig()
    batch = make_batch(2, 2, 4, config=config, dtype=torch.float32)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 64), torch.float32).requires_grad_(True)
    targets = torch.randint(0, 64, (B, T))
    hidden = _logits((B, T, 6), torch.float32).requires_grad_(True)
    weight = _logits((64, 6), torch.float32).requires_grad_(True)
    return config, batch, logits, targets, hidden, weight


def test_fallback_when_the_build_fails_warns_once(monkeypatch):
    """Simulated build failure: the dispatcher runs every op on the torch path, with exactly one warning;
    the backend's own functions, called directly, raise naming the build error instead."""

    simulate_build_failure(monkeypatch)
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    config, batch, logits, targets, hidden, weight = _fallback_inputs()
    loss_args = (batch.old_logp, batch.advantages, batch.mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not build.attempted()
        for _ in range(2):
            out = ops.fused_calibrl_loss(logits, targets, *loss_args, **batch.kwargs(config))
            ref = reference.fused_calibrl_loss(logits, targets, *loss_args, **batch.kwargs(config))
            assert_loss_outputs_close(out, ref, rtol=1e-6, atol=1e-7)
            ops.token_logprobs(logits, targets, return_entropy=True)
            lin = ops.fused_linear_calibrl_loss(hidden, weight, targets, *loss_args, **batch.kwargs(config))
            lin.loss.backward()
            ops.linear_token_logprobs(hidden, weight, targets)
    ours = [w for w in caught if "C++ CPU kernels could not be built" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "simulated: no C++ compiler" in str(ours[0].message)
    ok, reason = cpu.availability(torch.device("cpu"))
    assert not ok and "simulated" in reason
    assert _dispatch.selected_impl("fused_calibrl_loss", torch.device("cpu")) == "torch"
    for call in (
        lambda: cpu.token_logprobs(logits, targets),
        lambda: cpu.fused_calibrl_loss(logits, targets, batch.inputs(), config),
        lambda: cpu.fused_linear_calibrl_loss(hidden, weight, targets, batch.inputs(), config),
    ):
        with pytest.raises(RuntimeError, match="cpp.*called directly.*simulated: no C\\+\\+ compiler"):
            call()


def _run_python(code: str, timeout: int = 300) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("CALIBRL_IMPL", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_import_and_non_cpp_ops_do_not_build():
    code = (
        "import torch, calibrl_kernels as ck\n"
        "from calibrl_kernels import cpu\nfrom calibrl_kernels.cpu import build\n"
        "ck.group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))\n"
        "print('attempted', build.attempted())\n"
    )
    assert "attempted False" in _run_python(code)


def test_prebuild_command_prints_the_library(cpp):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-m", "calibrl_kernels.build", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "library:" in out.stdout and build.extension_name() in out.stdout


@pytest.mark.parametrize("op", ["token_logprobs", "fused_calibrl_loss"])
def test_second_order_gradients_raise(cpp, op):
    """The closed-form backward is first order only: differentiating it again raises (it used to give
    silently wrong results: the gradient did not require grad under create_graph=True)."""
    config = CalibRLConfig(entropy_coef=0.01)
    batch = make_batch(2, 2, 4, config=config, dtype=torch.float64)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 23), torch.float64).requires_grad_(True)
    targets = torch.randint(0, 23, (B, T), generator=torch.Generator().manual_seed(3))

    def run(fn_logits, fn_kind):
        if op == "token_logprobs":
            fn = cpu.token_logprobs if fn_kind == "cpp" else reference.token_logprobs
            logp, ent = fn(fn_logits, targets, 1.0, -100, True)
            return logp.sum() + ent.sum()
        if fn_kind == "cpp":
            return cpu.fused_calibrl_loss(fn_logits, targets, batch.inputs(), config).loss
        return reference.fused_calibrl_loss(
            fn_logits, targets, batch.old_logp, batch.advantages, batch.mask, **batch.kwargs(config)
        ).loss

    (want,) = torch.autograd.grad(run(logits, "reference"), (logits,))
    # A constant incoming gradient (the usual torch.autograd.grad(..., create_graph=True)).
    (grad,) = torch.autograd.grad(run(logits, "cpp"), (logits,), create_graph=True)
    assert grad.requires_grad
    assert max_rel_error(grad, want) < 1e-10  # first order is still right under create_graph=True
    with pytest.raises(RuntimeError, match="differentiate"):
        (grad**2).sum().backward()
    # An incoming gradient that itself requires grad (once_differentiable's own check).
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(run(logits, "cpp"), (logits,), grad_outputs=scale, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate"):
        grad.sum().backward()


def _inplace_case(dtype=torch.float32):
    config = CalibRLConfig(entropy_coef=0.02, temperature=0.8)
    batch = make_batch(2, 2, 5, config=config, dtype=torch.float32, seed=12)
    B, T = batch.old_logp.shape
    logits = _logits((B, T, 301), dtype, seed=12)
    targets = torch.randint(0, 301, (B, T), generator=torch.Generator().manual_seed(12))
    targets[0, 1] = -100
    return config, batch, logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_through_the_default_backend(cpp, monkeypatch, dtype):
    """ops.fused_calibrl_loss(..., inplace_backward=True) on CPU (the C++ backend): same gradient, written
    over the logits buffer (logits.grad aliases it), and a second backward is refused."""
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    assert _dispatch.selected_impl("fused_calibrl_loss", torch.device("cpu")) == "cpp"
    config, batch, logits, targets = _inplace_case(dtype)
    args = (targets, batch.old_logp, batch.advantages, batch.mask)
    plain = logits.clone().requires_grad_(True)
    want_out = ops.fused_calibrl_loss(plain, *args, **batch.kwargs(config))
    want_out.loss.backward()
    x = logits.clone().requires_grad_(True)
    out = ops.fused_calibrl_loss(x, *args, inplace_backward=True, **batch.kwargs(config))
    assert_loss_outputs_close(out, want_out, rtol=0, atol=0)
    out.loss.backward(retain_graph=True)
    assert torch.equal(x.grad, plain.grad)
    assert x.grad.data_ptr() == x.data_ptr() and torch.equal(x.detach(), plain.grad)  # overwritten by its gradient
    with pytest.raises(RuntimeError, match="inplace_backward"):
        out.loss.backward()


def test_inplace_backward_bumps_the_version_counter(cpp):
    """Another node that saved the logits fails loudly instead of reading gradients as logits."""
    config, batch, logits, targets = _inplace_case()
    base = logits.clone().requires_grad_(True)
    x = base * 1.0  # a non-leaf: the logits of a model
    other = torch.sin(x).sum()  # saves x (created first, so its backward runs after ours)
    out = cpu.fused_calibrl_loss(x, targets, batch.inputs(), config, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


def test_inplace_backward_on_shifted_logits_and_fallback(cpp, monkeypatch):
    """A strided slice (logits[:, :-1]) is written in place too; the torch fallback accepts the option."""
    config, batch, logits, targets = _inplace_case()
    B, T = targets.shape
    full = _logits((B, T + 1, 301), torch.float32, seed=4)
    args = (targets, batch.old_logp, batch.advantages, batch.mask)
    ref_full = full.clone().requires_grad_(True)
    reference.fused_calibrl_loss(ref_full[:, :-1], *args, **batch.kwargs(config)).loss.backward()
    ours_full = full.clone().requires_grad_(True)
    cpu.fused_calibrl_loss(ours_full[:, :-1], targets, batch.inputs(), config, inplace_backward=True).loss.backward()
    assert max_rel_error(ours_full.grad, ref_full.grad) < 1e-5
    simulate_build_failure(monkeypatch)  # the public op then runs the torch fallback, which accepts the option
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    y = logits.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        fallback = ops.fused_calibrl_loss(y, *args, inplace_backward=True, **batch.kwargs(config))
    fallback.loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_forced_cpp_with_a_failed_build_raises_on_every_call(monkeypatch):
    """CALIBRL_IMPL=cpp and no compiler: every call raises (the first one used to run torch silently),
    through the public ops and the backend's own functions alike, without the fallback warning."""
    simulate_build_failure(monkeypatch)
    monkeypatch.setenv("CALIBRL_IMPL", "cpp")
    config, batch, logits, targets, hidden, weight = _fallback_inputs()
    loss_args = (batch.old_logp, batch.advantages, batch.mask)
    calls = {
        "ops.token_logprobs": lambda: ops.token_logprobs(logits, targets),
        "ops.fused_calibrl_loss": lambda: ops.fused_calibrl_loss(logits, targets, *loss_args, **batch.kwargs(config)),
        "ops.fused_linear_calibrl_loss": lambda: ops.fused_linear_calibrl_loss(
            hidden, weight, targets, *loss_args, **batch.kwargs(config)
        ),
        "cpp.token_logprobs": lambda: cpu.token_logprobs(logits, targets),
        "cpp.linear_token_logprobs": lambda: cpu.linear_token_logprobs(hidden, weight, targets),
        "cpp.fused_calibrl_loss": lambda: cpu.fused_calibrl_loss(logits, targets, batch.inputs(), config),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for name, call in calls.items():
                with pytest.raises(RuntimeError, match="cpp.*requested.*simulated: no C\\+\\+ compiler"):
                    call()
                    pytest.fail(f"{name} ran")
    assert not [w for w in caught if "could not be built" in str(w.message)]
    # Not forced any more: the same process falls back to torch, with the one warning.
    monkeypatch.delenv("CALIBRL_IMPL")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(ops.token_logprobs(logits, targets), reference.token_logprobs(logits, targets))
    assert len([w for w in caught if "could not be built" in str(w.message)]) == 1


@pytest.mark.parametrize("op", ["linear_token_logprobs", "fused_linear_calibrl_loss"])
def test_fallback_keeps_the_chunk_budget(monkeypatch, op):
    """After a failed build the linear ops run the chunked torch row math with the caller's chunk budget."""
    from calibrl_kernels import chunked

    simulate_build_failure(monkeypatch)
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    config, batch, logits, targets, hidden, weight = _fallback_inputs()
    budget = 64 * 4 * chunked.TORCH_ROW_MATH.buffers_per_chunk  # one fp32 row of V = 64 per chunk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with chunked.record_chunks() as chunks:
            with chunked.chunk_bytes_scope(budget):
                if op == "linear_token_logprobs":
                    ops.linear_token_logprobs(hidden, weight, targets)
                else:
                    ops.fused_linear_calibrl_loss(
                        hidden, weight, targets, batch.old_logp, batch.advantages, batch.mask, **batch.kwargs(config)
                    )
    assert [record.rows for record in chunks] == [1]


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_masked_all_minus_inf_row_gets_a_zero_gradient(cpp, entropy_coef):
    """Tokens with a = b = 0 (masked or ignored) get an exactly zero gradient row, even a row of all -inf
    logits (padding), which used to give NaN (0 * NaN); -inf on part of the vocabulary stays exact."""
    config = CalibRLConfig(entropy_coef=entropy_coef)
    batch = make_batch(2, 2, 5, config=config, dtype=torch.float32, seed=3)
    B, T = batch.old_logp.shape
    V = 37
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    targets[2, 1] = -100
    logits = _logits((B, T, V), torch.float32, seed=3)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[::3] = True
    banned[targets[targets >= 0].unique()] = False
    logits[..., banned] = float("-inf")
    mask = batch.mask.clone()
    mask[0, T - 1] = 0.0
    logits[0, T - 1] = float("-inf")
    batch = batch._replace(mask=mask)
    active = (mask != 0) & (targets != -100)  # (B, T)
    args = (targets, batch.old_logp, batch.advantages, batch.mask)
    x = logits.clone().requires_grad_(True)
    out = cpu.fused_calibrl_loss(x, targets, batch.inputs(), config)
    out.loss.backward()
    ref_x = logits.to(torch.float64).requires_grad_(True)
    ref = reference.fused_calibrl_loss(ref_x, *args, **batch.kwargs(config))
    ref.loss.backward()
    assert_loss_outputs_close(out, ref, rtol=2e-5, atol=2e-6)
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~active], torch.zeros_like(x.grad[~active]))
    assert max_rel_error(x.grad[active], ref_x.grad[active]) < 2e-5
    # token_logprobs: a zero incoming gradient on the -inf row's logp and entropy gives a zero row too.
    y = logits.clone().requires_grad_(True)
    logp, ent = cpu.token_logprobs(y, targets, 1.0, -100, True)
    assert torch.isnan(logp[0, T - 1]) and torch.isnan(ent[0, T - 1])  # as the reference
    (logp[active].sum() + ent[active].sum()).backward()
    assert torch.isfinite(y.grad).all() and torch.equal(y.grad[~active], torch.zeros_like(y.grad[~active]))


@pytest.mark.parametrize("ci", ["true", "1", "True"])
def test_missing_compiler_fails_under_ci(monkeypatch, ci):
    """In CI (env CI set, as GitHub Actions / GitLab do) a C++ extension that cannot build fails the C++
    tests instead of skipping them all silently."""
    simulate_build_failure(monkeypatch)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(BaseException) as raised:
        cpp_module_or_skip()
    assert raised.type is pytest.fail.Exception and "simulated: no C++ compiler" in str(raised.value)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_compiler_skips_outside_ci(monkeypatch, ci):
    simulate_build_failure(monkeypatch)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(BaseException) as raised:
        cpp_module_or_skip()
    assert raised.type is pytest.skip.Exception and "simulated: no C++ compiler" in str(raised.value)


def _concurrent_first_calls(monkeypatch, compile_step, threads=8):
    """build.extension() from `threads` threads released together, with `compile_step` as the compiler."""
    import threading
    import types

    calls = []

    def counting_compile(verbose=False):
        calls.append(threading.get_ident())
        return compile_step()

    simulate_build_failure(monkeypatch)
    monkeypatch.setattr(build, "_compile_and_load", counting_compile)
    start = threading.Barrier(threads)
    results = [types.SimpleNamespace(value="not run") for _ in range(threads)]

    def worker(slot):
        start.wait()
        slot.value = build.extension()

    workers = [threading.Thread(target=worker, args=(slot,)) for slot in results]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    return calls, [slot.value for slot in results], [w for w in caught if "could not be built" in str(w.message)]


def test_lazy_build_compiles_once_under_concurrent_first_calls(monkeypatch):
    """Concurrent first calls: one compile (a slow fake), every thread gets the same module."""
    import time
    import types

    fake = types.SimpleNamespace(layout=build.expected_layout)

    def slow_compile():
        time.sleep(0.2)  # long enough for every thread to arrive while the first one compiles
        return fake

    calls, modules, warned = _concurrent_first_calls(monkeypatch, slow_compile)
    assert len(calls) == 1 and all(m is fake for m in modules) and not warned
    assert build.extension() is fake and len(calls) == 1


def test_lazy_build_fails_once_under_concurrent_first_calls(monkeypatch):
    """Concurrent first calls and a failing compile: one attempt, None everywhere, one warning."""
    import time

    def failing_compile():
        time.sleep(0.2)
        raise RuntimeError("simulated: compiler crashed")

    calls, modules, warned = _concurrent_first_calls(monkeypatch, failing_compile)
    assert len(calls) == 1 and modules == [None] * len(modules) and len(warned) == 1
    assert "simulated: compiler crashed" in str(build.build_error())


def test_extension_name_follows_the_sources_and_their_folder(monkeypatch, tmp_path):
    """One build folder per content of the C++ sources and per source folder, so checkouts sharing the torch
    extensions cache never rebuild over each other (torch's ninja file names the source paths)."""
    import shutil

    name = build.extension_name()
    assert name.startswith("calibrl_cpu_ops_") and name == build.extension_name()
    for file in build.SOURCES + build.HEADERS:
        shutil.copy(build.source_dir() / file, tmp_path / file)
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path)
    copied = build.extension_name()
    assert copied != name and copied == build.extension_name()  # same sources, another folder
    with open(tmp_path / build.HEADERS[0], "a") as header:
        header.write("\n// edited\n")
    assert build.extension_name() not in (name, copied)
