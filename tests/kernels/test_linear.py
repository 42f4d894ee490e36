"""Triton fused lm_head ops (linear_token_logprobs, fused_linear_calibrl_loss) against the reference
computed through explicit logits: values and the gradients of hidden, weight and bias.

Under the interpreter the heuristics use 16 x 32 tiles, split the vocabulary of each row block over
2 programs and chunk the backward every 64 vocabulary columns, so V = 97 covers partial tiles, the
split-V merge and several backward chunks (dHidden accumulated across them).

Gradient tolerances are relative to |truth| + the dot-product magnitude scale (``gemm_scales``).
bf16 values (loss, log-probs) must be within twice the reference's error. bf16 gradients are held to
eager bf16 autograd instead of the reference: the reference upcasts hidden and weight to fp32 before
its matmul, so its logits gradient is never rounded to bf16, which no bf16 step does; the kernels, like
eager bf16 autograd (and every tensor-core implementation), round the logits gradient to bf16 for the
two backward GEMMs. Criterion: error vs fp64 at most twice eager bf16's, and within 2^-7 of
|truth| + scale.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from _configs import LINEAR_KERNEL_CASES, configs
from _triton_helpers import LOSS_FIELDS, assert_close_rel, assert_no_worse_than_reference, cast_floating

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, chunked, reference

pytest.importorskip("triton")
from calibrl_kernels.triton import linear as triton_linear  # noqa: E402  (after the triton check)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.usefixtures("force_triton"),
]


def make_head(N, D, V, device, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, D, generator=g) / max(D, 1) ** 0.5 * 2).to(dtype).to(device)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).to(device) if bias else None
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, b, targets


def leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(dtype) if dtype is not None else t.detach()
        out.append(t.clone().requires_grad_(True))
    return out


def grads_of(tensors):
    return [None if t is None else t.grad for t in tensors]


def gemm_scales(hidden, weight, bias, loss_of_logits):
    """Elementwise magnitudes |dlogits| @ |W|, |dlogits|^T @ |h|, sum |dlogits| (fp64) of the three gradients.

    dHidden, dWeight and dBias are sums over V or N of dlogits-weighted terms; rounding errors of the
    summands (e.g. a one-ulp error of lse, which shifts every p_j of a row together) are bounded by these
    sums of magnitudes times the precision, not by the (possibly cancelled) result itself (Higham's
    bound for dot products). Tolerances below are relative to |truth| + this scale.
    """
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().double()
    logits = (h @ w.t() + (0 if bias is None else bias.detach().double())).requires_grad_(True)
    loss_of_logits(logits).backward()
    dlog = logits.grad.abs()
    return dlog @ w.abs(), dlog.t() @ h.abs(), dlog.sum(0)


def assert_grad_close(value, truth, scale, rtol, name):
    value, truth = value.detach().double().reshape(scale.shape), truth.detach().double().reshape(scale.shape)
    bound = rtol * (truth.abs() + scale) + 1e-30
    worst = float(((value - truth).abs() / bound).max())
    assert worst <= 1.0, (
        f"{name}: error {float((value - truth).abs().max()):.3e} exceeds rtol={rtol} of |truth| + scale "
        f"(ratio {worst:.2f})"
    )


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ------------------------------------------------------------------------------------------------
def run_logprobs(fn, hidden, weight, bias, targets, temperature, w_lp, w_h, dtype=None):
    h, w, b = leaves((hidden, weight, bias), dtype)
    lp, ent = fn(h, w, targets, bias=b, temperature=temperature, return_entropy=True)
    ((lp * w_lp.to(lp.dtype)).sum() + (ent * w_h.to(lp.dtype)).sum()).backward()
    return lp.detach(), ent.detach(), grads_of((h, w, b))


def reference_logprobs(h, w, targets, bias=None, temperature=1.0, return_entropy=True):
    return reference.linear_token_logprobs(h, w, targets, bias, temperature, -100, return_entropy)


def logprob_objective(targets, temperature, w_lp, w_h):
    def objective(logits):
        lp, ent = reference.token_logprobs(logits, targets.reshape(-1), temperature, -100, True)
        return (lp * w_lp.reshape(-1).double()).sum() + (ent * w_h.reshape(-1).double()).sum()

    return objective


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("N, D, V", [(1, 7, 1), (5, 24, 97), (13, 40, 50), (3, 1, 33), (20, 17, 16)])
def test_logprobs_fp32_match_fp64_reference(N, D, V, bias, triton_device):
    hidden, weight, b, targets = make_head(N, D, V, triton_device, bias=bias, seed=N + D + V)
    if N > 2:
        targets[1] = -100
    g = torch.Generator().manual_seed(1)
    w_lp, w_h = torch.randn(N, generator=g).to(triton_device), torch.randn(N, generator=g).to(triton_device)
    lp, ent, grads = run_logprobs(ck.linear_token_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h)
    lp64, ent64, grads64 = run_logprobs(reference_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h, torch.float64)
    assert lp.dtype == torch.float32
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(ent, ent64, 1e-5, "entropy")
    scales = gemm_scales(hidden, weight, b, logprob_objective(targets, 1.0, w_lp, w_h))
    for name, ours, truth, scale in zip(("dhidden", "dweight", "dbias"), grads, grads64, scales):
        if truth is not None:
            assert ours.dtype == torch.float32
            assert_grad_close(ours, truth, scale, 1e-5, name)
    assert (targets != -100).all() or torch.all(grads[0][targets == -100] == 0)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_temperature_and_3d_hidden(temperature, triton_device):
    hidden, weight, b, targets = make_head(6, 24, 97, triton_device, seed=3)
    hidden, targets = hidden.reshape(2, 3, 24), targets.reshape(2, 3)
    w_lp, w_h = torch.ones(2, 3, device=triton_device), torch.full((2, 3), -0.5, device=triton_device)
    lp, ent, grads = run_logprobs(ck.linear_token_logprobs, hidden, weight, b, targets, temperature, w_lp, w_h)
    lp64, ent64, grads64 = run_logprobs(
        reference_logprobs, hidden, weight, b, targets, temperature, w_lp, w_h, torch.float64
    )
    assert lp.shape == (2, 3) and grads[0].shape == (2, 3, 24)
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(ent, ent64, 1e-5, "entropy")
    scales = gemm_scales(hidden, weight, b, logprob_objective(targets, temperature, w_lp, w_h))
    for name, ours, truth, scale in zip(("dhidden", "dweight", "dbias"), grads, grads64, scales):
        assert_grad_close(ours, truth, scale, 1e-5, name)


def eager_bf16_logprobs(h, w, targets, bias=None, temperature=1.0, return_entropy=True):
    """What eager PyTorch does with bf16 parameters: a bf16 matmul (fp32 accumulation), so the logits
    gradient is rounded to bf16 before the two backward GEMMs, as in every tensor-core implementation."""
    logits = h @ w.t() + (0 if bias is None else bias)
    return reference.token_logprobs(logits, targets, temperature, -100, return_entropy)


def test_logprobs_bf16_error_no_worse_than_twice_the_reference(triton_device):
    hidden, weight, b, targets = make_head(13, 40, 97, triton_device, dtype=torch.bfloat16, seed=4)
    w_lp, w_h = torch.randn(13).to(triton_device), torch.randn(13).to(triton_device)
    ours = run_logprobs(ck.linear_token_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h)
    ref = run_logprobs(reference_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h)
    eager = run_logprobs(eager_bf16_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h)
    truth = run_logprobs(reference_logprobs, hidden, weight, b, targets, 1.0, w_lp, w_h, torch.float64)
    assert ours[2][0].dtype == torch.bfloat16 and ours[2][1].dtype == torch.bfloat16
    assert_no_worse_than_reference(ours[0], ref[0], truth[0], name="logp")
    assert_no_worse_than_reference(ours[1], ref[1], truth[1], name="entropy")
    scales = gemm_scales(hidden, weight, b, logprob_objective(targets, 1.0, w_lp, w_h))
    for name, a, e, t, scale in zip(("dhidden", "dweight", "dbias"), ours[2], eager[2], truth[2], scales):
        assert_no_worse_than_reference(a, e, t, slack=0.0, name=name + " vs eager bf16")
        assert_grad_close(a, t, scale, 2**-7, name)


def test_logprobs_all_ignored_and_partial_grads(triton_device):
    hidden, weight, b, targets = make_head(5, 8, 40, triton_device)
    targets[:] = -100
    h, w = leaves((hidden, weight))
    lp = ck.linear_token_logprobs(h, w, targets)
    lp.sum().backward()
    assert torch.all(lp == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    # gradient to one input only (weight frozen)
    hidden, weight, b, targets = make_head(5, 8, 40, triton_device, seed=2)
    h = hidden.clone().requires_grad_(True)
    ck.linear_token_logprobs(h, weight, targets, bias=b).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    reference_logprobs(h64, weight.double(), targets, b.double(), return_entropy=False).sum().backward()
    ones, zeros = torch.ones(5, device=triton_device), torch.zeros(5, device=triton_device)
    scale = gemm_scales(hidden, weight, b, logprob_objective(targets, 1.0, ones, zeros))[0]
    assert_grad_close(h.grad, h64.grad, scale, 1e-5, "dhidden")


def test_logprobs_float64_run_the_chunked_torch_path(triton_device, monkeypatch):
    """fp64 (which the fp32 kernels cannot honour) runs the chunked chunked path in fp64, never the
    reference, which would materialise (N, V) logits."""
    hidden, weight, b, targets = make_head(5, 4, 9, triton_device, dtype=torch.float64)
    lp_ref, ent_ref = reference_logprobs(hidden, weight, targets, b)
    monkeypatch.setattr(reference, "linear_logits", None)  # any use of the reference's logits fails
    h, w, bb = leaves((hidden, weight, b))
    with chunked.record_chunks() as chunks:
        lp, ent = ck.linear_token_logprobs(h, w, targets, bias=bb, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert chunks and lp.dtype == torch.float64 and h.grad.dtype == torch.float64
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# fused_linear_calibrl_loss
# ------------------------------------------------------------------------------------------------
def make_batch(B, T, D, V, device, dtype=torch.float32, bias=True, seed=0, masked="partial"):
    hidden, weight, b, targets = make_head(B * T, D, V, device, dtype, bias, seed)
    hidden, targets = hidden.reshape(B, T, D), targets.reshape(B, T)
    g = torch.Generator().manual_seed(seed + 1)
    if B * T > 2:
        targets[0, -1] = -100
    old_logp = (
        reference.linear_token_logprobs(hidden.float(), weight.float(), targets, None if b is None else b.float())
        + 0.3 * torch.randn(B, T, generator=g).to(device)
    ).detach()
    if masked == "partial":
        mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).float().to(device)
    else:
        mask = (torch.ones if masked == "none" else torch.zeros)(B, T, device=device)
    advantages = torch.randn(B, generator=g).to(device)
    kw = dict(
        expert_logp=(-3 * torch.rand(B, T, generator=g)).to(device),
        passed=(advantages > 0),
        is_expert=(torch.arange(B) % 3 == 2).to(device),
        expert_mask=(torch.rand(B, T, generator=g) > 0.3).to(device),
    )
    return (hidden, weight, b, targets, old_logp, advantages, mask, kw)


def run_loss(fn, batch, config, dtype=None):
    hidden, weight, b, targets, old_logp, advantages, mask, kw = batch
    h, w, bb = leaves((hidden, weight, b), dtype)
    fields = {k: cast_floating(v, dtype) for k, v in kw.items()}
    old_logp, advantages = cast_floating(old_logp, dtype), cast_floating(advantages, dtype)
    out = fn(h, w, targets, old_logp, advantages, mask, bias=bb, config=config, **fields)
    out.loss.backward()
    return out, grads_of((h, w, bb))


def loss_objective(batch, config):
    hidden, weight, b, targets, old_logp, advantages, mask, kw = batch
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}

    def objective(logits):
        return reference.fused_calibrl_loss(
            logits.reshape(*targets.shape, -1),
            targets,
            old_logp.double(),
            advantages.double(),
            mask,
            **kw64,
            config=config,
        ).loss

    return objective


def check_loss_matches_fp64(batch, config, rtol=1e-5):
    ours, grads = run_loss(ck.fused_linear_calibrl_loss, batch, config)
    ref, grads64 = run_loss(reference.fused_linear_calibrl_loss, batch, config, torch.float64)
    for name in LOSS_FIELDS:
        torch.testing.assert_close(
            getattr(ours, name).double(), getattr(ref, name).detach(), rtol=rtol, atol=1e-6, msg=name
        )
    scales = gemm_scales(batch[0], batch[1], batch[2], loss_objective(batch, config))
    for name, a, t, scale in zip(("dhidden", "dweight", "dbias"), grads, grads64, scales):
        if t is not None:
            assert a.dtype == torch.float32
            assert_grad_close(a, t, scale, rtol, name)
    return ours, grads


CONFIGS = configs(LINEAR_KERNEL_CASES)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.activation}-T{c.temperature}-{c.loss_agg_mode}")
def test_loss_every_mode_fp32(config, triton_device):
    check_loss_matches_fp64(make_batch(6, 3, 24, 97, triton_device, seed=5), config)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("B, T, D, V", [(1, 1, 7, 1), (1, 1, 16, 33), (2, 5, 40, 50), (4, 4, 1, 70)])
def test_loss_shapes(B, T, D, V, bias, triton_device):
    batch = make_batch(B, T, D, V, triton_device, bias=bias, seed=B * T + V, masked="none" if B * T == 1 else "partial")
    check_loss_matches_fp64(batch, CalibRLConfig(entropy_coef=0.01))


def test_loss_all_masked(triton_device):
    ours, grads = check_loss_matches_fp64(make_batch(3, 2, 8, 40, triton_device, masked="all"), CalibRLConfig())
    assert float(ours.loss.detach()) == 0.0 and all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize(
    "config", [CalibRLConfig(entropy_coef=0.01), CalibRLConfig.for_algo("luffy")], ids=["calibrl", "luffy"]
)
def eager_loss(hidden, weight, targets, old_logp, advantages, mask, *, bias=None, **kw):
    logits = hidden @ weight.t() + (0 if bias is None else bias)  # matmul in the input dtype, as eager PyTorch
    return reference.fused_calibrl_loss(logits, targets, old_logp, advantages, mask, **kw)


# (dtype, config, make_batch sizes and seed, gradient tolerance: 2^-7 for bf16, 4 ulps of fp16 for fp16)
LOW_PRECISION_CASES = {
    "bf16-calibrl": (torch.bfloat16, CalibRLConfig(entropy_coef=0.01), (4, 4, 40, 97), 6, 2**-7),
    "bf16-luffy": (torch.bfloat16, CalibRLConfig.for_algo("luffy"), (4, 4, 40, 97), 6, 2**-7),
    "fp16-calibrl": (torch.float16, CalibRLConfig(entropy_coef=0.01), (4, 3, 24, 97), 11, 2**-9),
}


@pytest.mark.parametrize("case", sorted(LOW_PRECISION_CASES))
def test_loss_low_precision_error_no_worse_than_twice_the_reference(case, triton_device):
    dtype, config, sizes, seed, grad_tol = LOW_PRECISION_CASES[case]
    batch = make_batch(*sizes, triton_device, dtype=dtype, seed=seed)
    ours, grads = run_loss(ck.fused_linear_calibrl_loss, batch, config)
    ref, _ = run_loss(reference.fused_linear_calibrl_loss, batch, config)
    _, grads_eager = run_loss(eager_loss, batch, config)  # eager autograd in the input dtype (bf16 / fp16)
    truth, grads64 = run_loss(reference.fused_linear_calibrl_loss, batch, config, torch.float64)
    for name in LOSS_FIELDS:
        assert_no_worse_than_reference(
            getattr(ours, name), getattr(ref, name), getattr(truth, name).detach(), name=name
        )
    scales = gemm_scales(batch[0], batch[1], batch[2], loss_objective(batch, config))
    for name, a, e, t, scale in zip(("dhidden", "dweight", "dbias"), grads, grads_eager, grads64, scales):
        assert a.dtype == dtype
        assert_no_worse_than_reference(a, e, t, slack=0.0, name=f"{name} vs eager {dtype}")
        assert_grad_close(a, t, scale, grad_tol, name)


def test_loss_scaled_incoming_gradient_and_frozen_weight(triton_device):
    batch = make_batch(3, 3, 16, 40, triton_device, seed=7)
    hidden, weight, b, targets, old_logp, adv, mask, kw = batch
    h = hidden.clone().requires_grad_(True)
    out = ck.fused_linear_calibrl_loss(h, weight, targets, old_logp, adv, mask, bias=b, **kw)
    (out.loss * -3.0).backward()
    h64 = hidden.double().requires_grad_(True)
    ref = reference.fused_linear_calibrl_loss(
        h64,
        weight.double(),
        targets,
        old_logp.double(),
        adv.double(),
        mask,
        bias=b.double(),
        **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()},
    )
    (ref.loss * -3.0).backward()
    objective = loss_objective(batch, CalibRLConfig())
    scale = gemm_scales(hidden, weight, b, lambda logits: objective(logits) * -3.0)[0]
    assert_grad_close(h.grad, h64.grad, scale, 1e-5, "dhidden")


def test_loss_through_ops_with_scores_and_group_ids(triton_device):
    B, T, D, V = 6, 3, 16, 40
    hidden, weight, b, targets = make_head(B * T, D, V, triton_device, seed=8)
    hidden, targets = hidden.reshape(B, T, D), targets.reshape(B, T)
    old_logp = reference.linear_token_logprobs(hidden, weight, targets, b).detach() - 0.05
    mask = torch.ones(B, T, device=triton_device)
    scores = torch.tensor([1.1, 0.0, 1.1, 0.1, 1.0, 1.1], device=triton_device)
    group_ids = torch.tensor([3, 3, 3, 8, 8, 8], device=triton_device)
    is_expert = torch.tensor([False, False, True, False, False, True], device=triton_device)
    results = []
    for impl in ("triton", "torch"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CALIBRL_IMPL", impl)
            h, w, bb = leaves((hidden, weight, b))
            out = ck.fused_linear_calibrl_loss(
                h, w, targets, old_logp, None, mask, bias=bb, scores=scores, group_ids=group_ids, is_expert=is_expert
            )
            out.loss.backward()
            results.append((out, grads_of((h, w, bb))))
    # a wiring test (scores / group ids resolved on the Triton path); accuracy is tested above
    for name in LOSS_FIELDS:
        torch.testing.assert_close(getattr(results[0][0], name), getattr(results[1][0], name), rtol=1e-5, atol=1e-6)
    for name, a, r in zip(("dhidden", "dweight", "dbias"), results[0][1], results[1][1]):
        assert_close_rel(a, r, 1e-4, name)


def test_dweight_is_deterministic(triton_device):
    batch = make_batch(4, 4, 24, 97, triton_device, dtype=torch.bfloat16, seed=9)
    first = run_loss(ck.fused_linear_calibrl_loss, batch, CalibRLConfig())[1]
    second = run_loss(ck.fused_linear_calibrl_loss, batch, CalibRLConfig())[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_backward_is_chunked_and_never_allocates_n_by_v(triton_device, monkeypatch):
    """The logits gradient lives in (N, chunk) buffers only; the chunk comes from the heuristics."""
    widths = []
    original = triton_linear._matmul

    def spy(a, b, c, accumulate, precision):
        widths.append(a.shape)
        return original(a, b, c, accumulate, precision)

    monkeypatch.setattr(triton_linear, "_matmul", spy)
    monkeypatch.setattr(triton_linear._launch, "LINEAR_CHUNK_BYTES", 6 * 16 * 4)  # GPU: one tile per chunk
    batch = make_batch(2, 3, 16, 150, triton_device, seed=10, masked="none")
    run_loss(ck.fused_linear_calibrl_loss, batch, CalibRLConfig())
    chunk = triton_linear._launch.linear_chunk_columns(
        6, 150, 4, triton_linear._launch.linear_tile_launch(torch.float32).block_n
    )
    assert chunk < 150
    assert len(widths) == 2 * -(-150 // chunk)  # dWeight and dHidden GEMM per chunk
    assert max(max(shape) for shape in widths) <= max(chunk, 16)  # no operand spans the vocabulary


@pytest.mark.parametrize("op", ["logprobs", "loss"])
def test_double_backward_raises(op, triton_device):
    """Both backwards are not differentiable: a second-order gradient raises instead of being wrong."""
    batch = make_batch(2, 3, 8, 20, triton_device, seed=17, masked="none")
    hidden, weight, b, targets, old_logp, adv, mask, kw = batch
    h, w = leaves((hidden, weight))
    if op == "logprobs":
        value = ck.linear_token_logprobs(h, w, targets, bias=b).sum()
    else:
        value = ck.fused_linear_calibrl_loss(h, w, targets, old_logp, adv, mask, bias=b, **kw).loss
    grad_h, grad_w = torch.autograd.grad(value, (h, w), create_graph=True)
    with pytest.raises(RuntimeError, match="supports first-order gradients only"):
        (value + (grad_h**2).sum() + (grad_w**2).sum()).backward()


@pytest.mark.parametrize("where", ["nan-weight", "inf-bias"])
def test_nan_weight_or_inf_bias_propagate_like_reference(where, triton_device):
    """A NaN lm_head weight entry (a diverged row) or a +inf bias makes every token's logits contain a
    NaN / +inf: log-probs, the loss and all three gradients are NaN, as with the reference."""
    batch = make_batch(2, 3, 16, 50, triton_device, seed=16, masked="none")
    hidden, weight, b, targets, old_logp, adv, mask, kw = batch
    targets[targets == 7] = 8
    targets[0, -1] = 3
    if where == "nan-weight":
        weight[7, 3] = float("nan")
    else:
        b[7] = float("inf")
    lp = ck.linear_token_logprobs(hidden, weight, targets, bias=b)
    lp_ref = reference.linear_token_logprobs(hidden, weight, targets, b)
    assert torch.isnan(lp_ref).all() and torch.isnan(lp).all()
    config = CalibRLConfig.for_algo("grpo")
    ours, grads = run_loss(ck.fused_linear_calibrl_loss, batch, config)
    ref, grads_ref = run_loss(reference.fused_linear_calibrl_loss, batch, config)
    assert torch.isnan(ref.loss) and torch.isnan(ours.loss)
    for name, a, r in zip(("dhidden", "dweight", "dbias"), grads, grads_ref):
        assert torch.isnan(r).all() and torch.isnan(a).all(), name


def test_the_dlogits_chunk_is_freed_before_dhidden_is_cast(triton_device, monkeypatch):
    """Peak memory of the backward: the (N, C) chunk buffer must not be alive when the fp32 dHidden
    accumulator is cast to the input dtype (that cast allocates dHidden itself)."""
    chunk_buffers, alive_at_cast = [], []
    original_matmul, original_narrowed = triton_linear._matmul, triton_linear._narrowed

    def matmul_spy(a, b, c, accumulate, precision):
        chunk_buffers.append(weakref.ref(a._base if a._base is not None else a))  # a: a view of the chunk buffer
        return original_matmul(a, b, c, accumulate, precision)

    def narrowed_spy(accumulator, dtype):
        alive_at_cast.append(any(ref() is not None for ref in chunk_buffers))
        return original_narrowed(accumulator, dtype)

    monkeypatch.setattr(triton_linear, "_matmul", matmul_spy)
    monkeypatch.setattr(triton_linear, "_narrowed", narrowed_spy)
    batch = make_batch(2, 3, 16, 90, triton_device, dtype=torch.bfloat16, seed=12, masked="none")
    _, grads = run_loss(ck.fused_linear_calibrl_loss, batch, CalibRLConfig())
    assert grads[0].dtype == torch.bfloat16 and chunk_buffers
    assert alive_at_cast and not any(alive_at_cast)


def test_loss_float64_runs_the_chunked_torch_path(triton_device, monkeypatch):
    batch = make_batch(2, 2, 4, 9, triton_device, dtype=torch.float64)
    config = CalibRLConfig(entropy_coef=0.01)
    ref, grads_ref = run_loss(reference.fused_linear_calibrl_loss, batch, config, torch.float64)
    monkeypatch.setattr(reference, "linear_logits", None)  # any use of the reference's logits fails
    with chunked.record_chunks() as chunks:
        out, grads = run_loss(ck.fused_linear_calibrl_loss, batch, config, torch.float64)
    assert chunks and out.loss.dtype == torch.float64
    for name in LOSS_FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name).detach(), rtol=1e-12, atol=1e-12, msg=name)
    for name, a, r in zip(("dhidden", "dweight", "dbias"), grads, grads_ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)


def test_fp32_dot_precision_follows_torch_tf32_settings_old_and_new():
    """fp32 operands go to TF32 exactly when torch's own fp32 matmuls would. Once the torch >= 2.9 API
    (``fp32_precision``, which transformers sets) is used, torch refuses reads of the legacy ``allow_tf32``:
    the op must still launch, reading the new setting."""
    matmul = torch.backends.cuda.matmul
    precision = triton_linear._dot_precision
    assert precision(torch.float32) == "ieee"  # torch's default: no TF32
    try:
        matmul.allow_tf32 = True  # the legacy API
        assert precision(torch.float32) == "tf32" and precision(torch.bfloat16) == "ieee"
    finally:
        matmul.allow_tf32 = False
    if not hasattr(torch.backends, "fp32_precision"):
        return  # torch < 2.9: nothing newer to read
    try:
        matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):  # what the old reading did: torch refuses mixed APIs
            matmul.allow_tf32
        assert precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert precision(torch.float32) == "ieee"
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"  # inherited by cuda.matmul, as torch resolves it
        assert precision(torch.float32) == "tf32"
    finally:
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "none"
    assert precision(torch.float32) == "ieee"
