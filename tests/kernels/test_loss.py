"""Triton fused_calibrl_loss (logits path) against the torch reference: every mode, activation,
baseline shape, aggregation, masking option, temperature and dtype; the closed-form gradient
coefficients against reference.gradient_coefficients (autograd); the in-place gradient option.
"""

from __future__ import annotations

import pytest
import torch
from _configs import LOGITS_KERNEL_CASES, NAN_CASES, configs
from _triton_helpers import LOSS_FIELDS, assert_close_rel, assert_no_worse_than_reference, cast_floating

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, reference
from calibrl_kernels.config import LossInputs
from calibrl_kernels.reference import coefficients
from calibrl_kernels.reference.coefficients import ROW_FIELDS, TOKEN_FIELDS, fill_row_terms, loss_output

pytest.importorskip("triton")
import triton  # noqa: E402  (installed: importorskip above)
import triton.language as tl  # noqa: E402

from calibrl_kernels.triton import _loss_terms  # noqa: E402  (after the triton check)
from calibrl_kernels.triton import loss as triton_loss  # noqa: E402
from calibrl_kernels.triton._loss_terms import focal_factor  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.usefixtures("force_triton"),
]


def make_inputs(B, T, V, device, dtype=torch.float32, seed=0, baseline_shape="position", masked="partial"):
    """A batch with every kind of token: expert rows, padding, ignore_index targets, clipped ratios."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    if B * T > 2:
        targets[0, -1] = -100
    # old log-probs of a nearby policy: ratios both inside and outside the clip range
    noisy = logits.float() + 0.6 * torch.randn(B, T, V, generator=g)
    old_logp = reference.token_logprobs(noisy, targets).detach()
    if masked == "partial":
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    elif masked == "none":
        mask = torch.ones(B, T)
    else:  # all masked
        mask = torch.zeros(B, T)
    advantages = torch.randn(B, generator=g)
    passed = advantages > 0
    is_expert = torch.arange(B) % 3 == 2
    if baseline_shape == "position":
        expert_logp = -3 * torch.rand(B, T, generator=g)
    else:
        expert_logp = -3 * torch.rand(B, generator=g)
    expert_mask = torch.rand(B, T, generator=g) > 0.3
    kw = dict(expert_logp=expert_logp, passed=passed, is_expert=is_expert, expert_mask=expert_mask)
    to = lambda t: t.to(device)  # noqa: E731
    return to(logits), to(targets), to(old_logp), to(advantages), to(mask), {k: to(v) for k, v in kw.items()}


def run_loss(fn, logits, targets, old_logp, advantages, mask, kw, config, upcast=None, **extra):
    """LossOutput and dL/dlogits of one implementation (upcast: run on logits.to(upcast))."""
    x = (logits.to(upcast) if upcast is not None else logits).detach().clone().requires_grad_(True)
    fields = {k: cast_floating(v, upcast) for k, v in kw.items()}
    old_logp, advantages = cast_floating(old_logp, upcast), cast_floating(advantages, upcast)
    out = fn(x, targets, old_logp, advantages, mask, config=config, **fields, **extra)
    out.loss.backward()
    return out, x.grad


def reference_fn(*args, **kw):
    return reference.fused_calibrl_loss(*args, **kw)


def assert_matches_fp64(inputs, config, rtol=1e-5):
    ours, grad = run_loss(ck.fused_calibrl_loss, *inputs, config)
    ref, grad64 = run_loss(reference_fn, *inputs, config, upcast=torch.float64)
    for name in LOSS_FIELDS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == torch.float32 and a.shape == ()
        torch.testing.assert_close(a.double(), b.detach(), rtol=rtol, atol=1e-6, msg=name)
    assert_close_rel(grad, grad64, rtol, "dlogits")
    return ours, grad


CONFIGS = configs(LOGITS_KERNEL_CASES)


def _config_id(config):
    defaults = CalibRLConfig()
    return (
        "-".join(
            f"{f}={getattr(config, f)}"
            for f in config.__dataclass_fields__
            if getattr(config, f) != getattr(defaults, f)
        )
        or "default"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_every_mode_and_option_matches_reference(config, triton_device):
    inputs = make_inputs(6, 5, 50, triton_device, seed=1)
    assert_matches_fp64(inputs, config)


@pytest.mark.parametrize("baseline_shape", ["position", "row"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregations_and_baseline_shapes(agg, baseline_shape, triton_device):
    inputs = make_inputs(6, 4, 37, triton_device, seed=2, baseline_shape=baseline_shape)
    assert_matches_fp64(inputs, CalibRLConfig(loss_agg_mode=agg, entropy_coef=0.01))


@pytest.mark.parametrize(
    "B, T, V",
    [(1, 1, v) for v in (1, 7, 1000, 32003)] + [(5, 1, v) for v in (1, 7, 1000, 32003)] + [(8, 8, 7), (8, 8, 1000)],
)
def test_shapes(B, T, V, triton_device):
    inputs = make_inputs(B, T, V, triton_device, seed=B + V, masked="none" if B * T == 1 else "partial")
    assert_matches_fp64(inputs, CalibRLConfig(entropy_coef=0.01))


@pytest.mark.parametrize("config", [CalibRLConfig(), CalibRLConfig.for_algo("rlplus")], ids=["calibrl", "rlplus"])
def test_token_level_advantages_and_bool_mask(config, triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(6, 4, 30, triton_device, seed=12)
    token_adv = adv[:, None] * torch.linspace(0.5, 1.5, 4, device=triton_device)[None, :]  # (B, T)
    assert_matches_fp64((logits, targets, old_logp, token_adv, mask.bool(), kw), config)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(temperature, triton_device):
    inputs = make_inputs(4, 3, 100, triton_device, seed=3)
    assert_matches_fp64(inputs, CalibRLConfig(temperature=temperature, entropy_coef=0.02))


@pytest.mark.parametrize("config", [CalibRLConfig(), CalibRLConfig.for_algo("luffy")], ids=["calibrl", "luffy"])
def test_all_masked_gives_zero_loss_and_gradient(config, triton_device):
    inputs = make_inputs(3, 4, 20, triton_device, masked="all")
    ours, grad = assert_matches_fp64(inputs, config)
    assert float(ours.loss.detach()) == 0.0 and torch.all(grad == 0)


def test_ignore_index_tokens_are_left_out(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(4, 5, 30, triton_device, seed=4, masked="none")
    targets[targets == -100] = 0
    targets[1, :3] = 5  # ignore_index = 5 (also a valid id elsewhere: only the positions matter)
    targets[1, 3:] = 6
    inputs = (logits, targets, old_logp, adv, mask, kw)
    ours, grad = run_loss(ck.fused_calibrl_loss, *inputs, CalibRLConfig(), ignore_index=5)
    ref, grad64 = run_loss(reference_fn, *inputs, CalibRLConfig(), upcast=torch.float64, ignore_index=5)
    for name in LOSS_FIELDS:
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name).detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(grad[targets == 5] == 0)
    assert_close_rel(grad, grad64, 1e-5, "dlogits")


@pytest.mark.parametrize(
    "config", [CalibRLConfig(entropy_coef=0.01), CalibRLConfig.for_algo("rlplus")], ids=["calibrl", "rlplus"]
)
@pytest.mark.parametrize("V", [1000, 7])
def test_bf16_error_no_worse_than_twice_the_reference(V, config, triton_device):
    inputs = make_inputs(6, 4, V, triton_device, dtype=torch.bfloat16, seed=5)
    ours, grad = run_loss(ck.fused_calibrl_loss, *inputs, config)
    ref, grad_ref = run_loss(reference_fn, *inputs, config)
    truth, grad64 = run_loss(reference_fn, *inputs, config, upcast=torch.float64)
    assert grad.dtype == torch.bfloat16
    for name in LOSS_FIELDS:
        assert_no_worse_than_reference(
            getattr(ours, name), getattr(ref, name), getattr(truth, name).detach(), name=name
        )
    assert_no_worse_than_reference(grad, grad_ref, grad64, slack=1e-3, name="dlogits")


def test_scores_and_group_ids_resolved_on_the_triton_path(triton_device):
    """End to end through ops: group statistics and the expert baseline built from the batch."""
    g = torch.Generator().manual_seed(6)
    B, T, V = 6, 4, 40
    logits = torch.randn(B, T, V, generator=g).to(triton_device)
    targets = torch.randint(0, V, (B, T), generator=g).to(triton_device)
    old_logp = reference.token_logprobs(logits + 0.3, targets).to(triton_device)
    mask = torch.ones(B, T, device=triton_device)
    mask[1, 2:] = 0
    scores = torch.tensor([1.1, 0.0, 1.1, 0.1, 1.0, 1.1], device=triton_device)
    group_ids = torch.tensor([5, 5, 5, -1, -1, -1], device=triton_device)
    is_expert = torch.tensor([False, False, True, False, False, True], device=triton_device)
    config = CalibRLConfig(mask_beyond_expert=True)
    out = []
    for impl in ("triton", "torch"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CALIBRL_IMPL", impl)
            x = logits.clone().requires_grad_(True)
            o = ck.fused_calibrl_loss(
                x, targets, old_logp, None, mask, scores=scores, group_ids=group_ids, is_expert=is_expert, config=config
            )
            o.loss.backward()
            out.append((o, x.grad))
    for name in LOSS_FIELDS:
        torch.testing.assert_close(getattr(out[0][0], name), getattr(out[1][0], name), rtol=1e-5, atol=1e-6)
    assert_close_rel(out[0][1], out[1][1], 1e-5, "dlogits")


def test_strided_logits_view(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(4, 3, 40, triton_device, seed=7)
    wide = torch.randn(4, 3, 48, device=triton_device).transpose(0, 1).contiguous().transpose(0, 1)  # time-major
    wide[:, :, 4:44] = logits
    view = wide[:, :, 4:44]
    assert view.stride(-1) == 1 and not view.is_contiguous()
    assert_matches_fp64((view, targets, old_logp, adv, mask, kw), CalibRLConfig(entropy_coef=0.01))


def test_metrics_are_detached_and_loss_differentiable(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(3, 2, 10, triton_device)
    out = ck.fused_calibrl_loss(logits.requires_grad_(True), targets, old_logp, adv, mask, **kw)
    assert out.loss.requires_grad
    assert all(not getattr(out, name).requires_grad for name in LOSS_FIELDS[1:])
    assert set(out.metrics()) == set(LOSS_FIELDS)


def test_float64_logits_use_the_reference(triton_device):
    inputs = make_inputs(3, 2, 10, triton_device)
    logits = inputs[0].double()
    out = ck.fused_calibrl_loss(logits, *inputs[1:5], **inputs[5])
    ref = reference.fused_calibrl_loss(logits, *inputs[1:5], **inputs[5])
    assert out.loss.dtype == torch.float64 and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_double_backward_raises(inplace, triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(2, 3, 20, triton_device, seed=18)
    base = logits.clone().requires_grad_(True)
    x = base * 1.0
    out = ck.fused_calibrl_loss(x, targets, old_logp, adv, mask, **kw, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(out.loss, base, create_graph=True)
    with pytest.raises(RuntimeError, match="supports first-order gradients only"):
        torch.autograd.grad((grad**2).sum(), base)


NAN_CONFIGS = configs(NAN_CASES)


@pytest.mark.parametrize("config", NAN_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_logits_make_the_loss_nan_like_reference(bad, config, triton_device):
    """One NaN / +inf logit in a counted token: loss, ppo_kl and entropy are NaN and that token's gradient
    row is NaN, as with the reference; the other tokens' gradients are unaffected."""
    logits, targets, old_logp, adv, mask, kw = make_inputs(4, 3, 50, triton_device, seed=14, masked="none")
    targets[0, 2] = 7
    logits[0, 1, (targets[0, 1] + 1) % 50] = bad  # row 0 is an on-policy row
    inputs = (logits, targets, old_logp, adv, mask, kw)
    ours, grad = run_loss(ck.fused_calibrl_loss, *inputs, config)
    ref, grad64 = run_loss(reference_fn, *inputs, config, upcast=torch.float64)
    for name in LOSS_FIELDS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert bool(torch.isnan(a)) == bool(torch.isnan(b)), name
        if not torch.isnan(b):
            torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isnan(ours.loss) and torch.isnan(ours.ppo_kl)
    assert torch.isnan(grad[0, 1]).all() and torch.isnan(grad64[0, 1]).all()
    others = torch.ones(4, 3, dtype=torch.bool)
    others[0, 1] = False
    assert_close_rel(grad[others], grad64[others], 1e-5, "dlogits of the other tokens")


def test_nan_logits_of_a_masked_token_are_never_read(triton_device):
    """A padding token's logits do not enter the loss (the kernel skips them): the loss is that of the
    reference, whose loss guards padding too, and the token gets a zero gradient."""
    logits, targets, old_logp, adv, mask, kw = make_inputs(4, 3, 50, triton_device, seed=15, masked="none")
    targets[0, 2] = 7
    logits[0, 1, :] = float("nan")
    mask[0, 1] = 0
    inputs = (logits, targets, old_logp, adv, mask, kw)
    config = CalibRLConfig(entropy_coef=0.01)
    ours, grad = run_loss(ck.fused_calibrl_loss, *inputs, config)
    ref, grad64 = run_loss(reference_fn, *inputs, config, upcast=torch.float64)
    for name in LOSS_FIELDS:
        torch.testing.assert_close(
            getattr(ours, name).double(), getattr(ref, name).detach(), rtol=1e-5, atol=1e-6, msg=name
        )
    assert torch.all(grad[0, 1] == 0)  # (torch's log_softmax backward puts 0 * NaN = NaN there)
    others = torch.ones(4, 3, dtype=torch.bool)
    others[0, 1] = False
    assert_close_rel(grad[others], grad64[others], 1e-5, "dlogits of the other tokens")


# ------------------------------------------------------------------------------------------------
# Closed-form gradient coefficients vs autograd of the reference loss
# ------------------------------------------------------------------------------------------------
def kernel_outputs(logits, targets, old_logp, adv, mask, kw, config, ignore_index=-100):
    """The kernel's row table as {column name (coefficients.ROW_FIELDS): (B, T) tensor}."""
    inputs = LossInputs(
        old_logp, adv, mask, kw["expert_logp"], kw["passed"], kw["is_expert"], kw["expert_mask"], ignore_index
    )
    table = coefficients.loss_token_table(targets, inputs, config, torch.float32)
    rows = triton_loss.as_token_rows(logits)
    out = triton_loss.calibrl_loss_forward(rows, targets.reshape(-1), table, config, ignore_index)
    assert out.shape == (targets.numel(), _loss_terms.TOKEN_OUTPUTS)
    return {name: out[:, i].reshape(targets.shape) for i, name in enumerate(ROW_FIELDS)}


def reference_coefficients(lp, entropy, targets, old_logp, adv, mask, kw, config, ignore_index=-100):
    token_mask = mask * (targets != ignore_index)
    _, a, b = reference.gradient_coefficients(
        lp.double(),
        entropy.double(),
        old_logp.double(),
        adv.double(),
        token_mask,
        expert_logp=kw["expert_logp"].double(),
        passed=kw["passed"],
        is_expert=kw["is_expert"],
        expert_mask=kw["expert_mask"],
        config=config,
    )
    return a, b


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_closed_form_coefficients_match_autograd(config, triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(6, 5, 30, triton_device, seed=8)
    out = kernel_outputs(logits, targets, old_logp, adv, mask, kw, config)
    lp, entropy = out["logp"], out["entropy"]
    a, b = reference_coefficients(lp, entropy, targets, old_logp, adv, mask, kw, config)
    assert_close_rel(out["coef_a"], a, 1e-5, "a = -dL/dlp")
    assert_close_rel(out["coef_b"], b, 1e-5, "b = -dL/dH")
    # the kernel's lp / H are those of the reference
    lp_ref, h_ref = reference.token_logprobs(logits.double(), targets, config.temperature, -100, True)
    counted = (mask * (targets != -100)) != 0
    assert_close_rel(lp[counted], lp_ref[counted], 1e-5, "lp")
    assert_close_rel(entropy[counted], h_ref[counted], 1e-5, "entropy")


@pytest.mark.parametrize(
    "config",
    [
        CalibRLConfig(entropy_coef=0.02),
        CalibRLConfig.for_algo("rlplus"),
        CalibRLConfig(weight_by_advantage=False, mask_beyond_expert=True, loss_agg_mode="seq-mean-token-sum"),
    ],
    ids=_config_id,
)
def test_tables_are_those_of_every_backend(config, triton_device):
    """The kernel reads ``coefficients.token_table`` and writes the ``coefficients.ROW_FIELDS`` row table:
    its terms and coefficients are those the torch / C++ closed form (``fill_row_terms``) derives from the
    kernel's own lp and H, and ``coefficients.loss_output`` of its column sums is the op's LossOutput."""
    logits, targets, old_logp, adv, mask, kw = make_inputs(6, 5, 30, triton_device, seed=19)
    inputs = LossInputs(old_logp, adv, mask, kw["expert_logp"], kw["passed"], kw["is_expert"], kw["expert_mask"], -100)
    table = coefficients.loss_token_table(targets, inputs, config, torch.float32)
    assert table.shape == (30, len(TOKEN_FIELDS)) and table.dtype == torch.float32
    out = triton_loss.calibrl_loss_forward(triton_loss.as_token_rows(logits), targets.reshape(-1), table, config, -100)
    expected = out.clone()
    fill_row_terms(expected, table, config)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    summed = loss_output(out[:, ROW_FIELDS.index("pg") :].sum(0), config)
    op = ck.fused_calibrl_loss(logits, targets, old_logp, adv, mask, **kw, config=config)
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(op, name), getattr(summed, name)), name


@pytest.mark.parametrize(
    "config",
    [
        CalibRLConfig(),
        CalibRLConfig(activation="relu"),
        CalibRLConfig(activation="huber"),
        CalibRLConfig.for_algo("luffy"),
    ],
    ids=["leaky_relu", "relu", "huber", "luffy"],
)
def test_coefficients_at_ties_and_kinks_follow_torch(config, triton_device):
    """lp == old_lp (l1 == l2), A == 0 (everything ties), lp == baseline (z == 0, the activation's kink)."""
    logits, targets, old_logp, adv, mask, kw = make_inputs(6, 4, 20, triton_device, seed=9, masked="none")
    lp = kernel_outputs(logits, targets, old_logp, adv, mask, kw, config)["logp"]
    steps = torch.arange(4, device=triton_device)[None, :]
    old_logp = torch.where(steps % 2 == 0, lp, old_logp)  # exact ratio 1 on even positions
    adv[1] = 0.0
    kw["expert_logp"] = torch.where(steps >= 2, lp, kw["expert_logp"])  # z == 0
    out = kernel_outputs(logits, targets, old_logp, adv, mask, kw, config)
    assert torch.equal(out["logp"], lp)  # deterministic: the ties are exact
    a, b = reference_coefficients(lp, out["entropy"], targets, old_logp, adv, mask, kw, config)
    assert_close_rel(out["coef_a"], a, 1e-5, "a = -dL/dlp")
    assert_close_rel(out["coef_b"], b, 1e-5, "b = -dL/dH")


# ------------------------------------------------------------------------------------------------
# In-place gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient_and_overwrites_logits(dtype, triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(4, 3, 100, triton_device, dtype=dtype, seed=10)
    config = CalibRLConfig(entropy_coef=0.01)
    expected_out, expected_grad = run_loss(ck.fused_calibrl_loss, logits, targets, old_logp, adv, mask, kw, config)
    # non-leaf logits, as produced by an lm_head: the gradient flows on to the producer's inputs
    base = logits.detach().clone().requires_grad_(True)
    produced = base * 1.0
    out = ck.fused_calibrl_loss(produced, targets, old_logp, adv, mask, **kw, config=config, inplace_backward=True)
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(out, name), getattr(expected_out, name)), name
    (out.loss * 2.0).backward()  # an incoming gradient != 1 is applied on the device
    assert torch.equal(base.grad, expected_grad * 2.0)  # scaling by 2 is exact, so the results are identical
    assert torch.equal(produced.detach(), base.grad)  # the logits buffer now holds its gradient


def test_inplace_backward_on_a_leaf(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(3, 3, 40, triton_device, seed=11)
    _, expected_grad = run_loss(ck.fused_calibrl_loss, logits, targets, old_logp, adv, mask, kw, CalibRLConfig())
    x = logits.clone().requires_grad_(True)
    ck.fused_calibrl_loss(x, targets, old_logp, adv, mask, **kw, inplace_backward=True).loss.backward()
    assert torch.equal(x.grad, expected_grad)
    assert torch.equal(x.detach(), expected_grad)  # the logits buffer now holds its gradient


def test_inplace_backward_refuses_a_second_backward(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(2, 2, 10, triton_device)
    x = logits.clone().requires_grad_(True)
    out = ck.fused_calibrl_loss(x, targets, old_logp, adv, mask, **kw, inplace_backward=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        out.loss.backward()


def test_inplace_backward_is_detected_by_nodes_that_saved_the_logits(triton_device):
    logits, targets, old_logp, adv, mask, kw = make_inputs(2, 2, 10, triton_device)
    y = logits.clone().requires_grad_(True)
    produced = torch.exp(y)  # exp saves its output for its own backward
    out = ck.fused_calibrl_loss(produced, targets, old_logp, adv, mask, **kw, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_inplace_backward_must_be_a_bool(triton_device):
    inputs = make_inputs(2, 2, 10, triton_device)
    with pytest.raises(TypeError, match="inplace_backward"):
        ck.fused_calibrl_loss(*inputs[:5], **inputs[5], inplace_backward=1)


def test_reference_accepts_the_inplace_keyword(monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", "torch")
    logits, targets, old_logp, adv, mask, kw = make_inputs(2, 2, 10, "cpu")
    x = logits.clone().requires_grad_(True)
    ck.fused_calibrl_loss(x, targets, old_logp, adv, mask, **kw, inplace_backward=True).loss.backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------
# The constexpr codes and constants of the kernels come from config
# ------------------------------------------------------------------------------------------------
def test_kernel_codes_cover_every_mode_and_activation():
    from calibrl_kernels.config import ACTIVATIONS, MODES

    assert sorted(_loss_terms.ACTIVATION_CODES) == sorted(a for a in ACTIVATIONS if a != "none")
    assert len(set(_loss_terms.ACTIVATION_CODES.values())) == len(_loss_terms.ACTIVATION_CODES)
    for mode in MODES:  # exactly the modes that keep expert rows have an expert-token term
        expected = "ppo" if not CalibRLConfig(mode=mode).keeps_expert_rows else mode
        assert _loss_terms.policy_code(mode) == _loss_terms.POLICY_CODES[expected]
    for activation in ACTIVATIONS:
        config = CalibRLConfig(activation=activation)
        code = _loss_terms.activation_code(config)
        assert code == (_loss_terms.ACTIVATION_CODES[activation] if config.uses_guide else 0)


@triton.jit
def _focal_kernel(x_ptr, out_ptr, n, POWER: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, focal_factor(x, POWER), mask=inside)


def test_focal_factor_is_the_configured_power(triton_device):
    """RL-PLUS's focal factor (1 - p)^RLPLUS_FOCAL_POWER: the kernels' helper for that and other powers."""
    from calibrl_kernels.config import RLPLUS_FOCAL_POWER

    assert _loss_terms._RLPLUS_FOCAL_POWER == RLPLUS_FOCAL_POWER
    x = torch.tensor([0.0, 1e-30, 1e-6, 0.3, 0.5, 0.99, 1.0])
    for power in (RLPLUS_FOCAL_POWER, 0.25, 1.0, 2.0):
        out = torch.empty_like(x, device=triton_device)
        _focal_kernel[(1,)](x.to(triton_device), out, x.numel(), POWER=power, BLOCK=8)
        torch.testing.assert_close(out.cpu(), x.double().pow(power).float(), rtol=2e-6, atol=0.0, msg=str(power))
