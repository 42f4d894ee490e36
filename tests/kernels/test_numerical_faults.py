"""Numerical faults: what every backend does with non-finite, huge or sharpened logits.

The behaviour (README "Reliability", "Numerical faults"), on torch, cpp and triton (interpreter) alike:
- a -inf logit at a non-target entry (a masked vocabulary) is exact: the entry gets probability 0 and a
  zero gradient, everything else equals the fp64 reference;
- a -inf logit at the target gives logp = -inf with a finite entropy and finite gradients;
- a NaN or +inf logit in a row, or a row of all -inf, gives NaN logp / entropy / gradient for THAT row only
  (as torch's log_softmax); other rows stay exact. Nothing is silently replaced by a number;
- masked (mask 0) and ignored (target = ignore_index) tokens are never read: their logits may hold NaN
  (padding garbage) and they still get logp 0, an exactly zero gradient, and the loss stays finite;
- logits of magnitude 1e4 and temperature 1e-4 (logits / T ~ 1e4) stay finite and match the fp64 reference
  (max-subtracted log-sum-exp); entropy is never negative;
- zero-variance groups and groups of one get advantage 0; a group made of expert rows only is refused.
"""

import pytest
import torch

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN cases
B, T, V, D = 3, 4, 11, 5  # V not a multiple of any block


def _problem(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    targets = torch.randint(0, V, (B, T), generator=g)
    return logits, targets


def _logprobs_and_grad(logits, targets, temperature=1.0):
    x = logits.clone().requires_grad_(True)
    logp, entropy = ck.token_logprobs(x, targets, temperature=temperature, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def _reference(logits, targets, temperature=1.0):
    return _logprobs_and_grad_ref(logits.double(), targets, temperature)


def _logprobs_and_grad_ref(logits, targets, temperature):
    x = logits.clone().requires_grad_(True)
    logp, entropy = reference.token_logprobs(x, targets, temperature=temperature, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def test_minus_inf_at_non_target_is_exact(backend):
    logits, targets = _problem()
    blocked = (targets[0, 0] + 1) % V
    logits[0, 0, blocked] = float("-inf")
    logp, entropy, grad = _logprobs_and_grad(logits, targets)
    ref_logp, ref_entropy, ref_grad = _reference(logits, targets)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    assert grad[0, 0, blocked] == 0 and torch.isfinite(grad).all()


def test_minus_inf_at_target_gives_minus_inf_logp_and_finite_gradient(backend):
    logits, targets = _problem(1)
    logits[0, 0, targets[0, 0]] = float("-inf")
    logp, entropy, grad = _logprobs_and_grad(logits, targets)
    assert logp[0, 0] == float("-inf") and torch.isfinite(logp.flatten()[1:]).all()
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    ref_grad = _reference(logits, targets)[2]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault", ["nan", "+inf", "all -inf"])
def test_non_finite_row_is_nan_and_contained(backend, fault):
    logits, targets = _problem(2)
    if fault == "all -inf":
        logits[1, 2, :] = float("-inf")
    else:
        logits[1, 2, 3] = float("nan") if fault == "nan" else float("inf")
    logp, entropy, grad = _logprobs_and_grad(logits, targets)
    bad = torch.zeros(B, T, dtype=torch.bool)
    bad[1, 2] = True
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all()
    assert torch.isnan(grad[1, 2]).all()  # the fault shows in the gradient too: nothing hides it
    ref_logp, ref_entropy, ref_grad = _reference(logits, targets)
    torch.testing.assert_close(logp[~bad].double(), ref_logp[~bad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[~bad].double(), ref_entropy[~bad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[~bad].double(), ref_grad[~bad], rtol=1e-5, atol=1e-5)


def _loss_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(
        old_logp=torch.randn(B, T, generator=g) - 2,
        advantages=torch.randn(B, generator=g),
        expert_logp=torch.randn(B, T, generator=g) - 2,
        passed=torch.tensor([True, False, True]),
        is_expert=torch.tensor([False, False, True]),
    )


@pytest.mark.parametrize("how", ["masked", "ignored"])
def test_nan_in_unread_tokens_never_reaches_loss_or_gradient(backend, how):
    logits, targets = _problem(4)
    mask = torch.ones(B, T)
    logits[0, 3] = float("nan")  # padding garbage
    logits[2, 1] = float("inf")
    for b, t in ((0, 3), (2, 1)):
        if how == "masked":
            mask[b, t] = 0
        else:
            targets[b, t] = -100
    x = logits.clone().requires_grad_(True)
    args = _loss_inputs()
    out = ck.fused_calibrl_loss(x, targets, mask=mask, ignore_index=-100, **args)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.entropy)
    assert torch.isfinite(x.grad).all() and (x.grad[0, 3] == 0).all() and (x.grad[2, 1] == 0).all()
    clean = logits.clone()
    clean[0, 3] = 0.0
    clean[2, 1] = 0.0
    ref = reference.fused_calibrl_loss(
        clean.double(),
        targets,
        mask=mask.double(),
        ignore_index=-100,
        **{k: (v.double() if v.is_floating_point() else v) for k, v in args.items()},
    )
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["magnitude 1e4", "temperature 1e-4"])
def test_huge_and_sharpened_logits_stay_finite_and_exact(backend, dtype, case):
    scale, temperature = (1e4, 1.0) if case == "magnitude 1e4" else (1.0, 1e-4)
    logits, targets = _problem(5, scale)
    logits = logits.to(dtype)
    logp, entropy, grad = _logprobs_and_grad(logits, targets, temperature)
    ref_logp, ref_entropy, ref_grad = _reference(logits, targets, temperature)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad.float()).all()
    assert (entropy >= 0).all()
    # logp ~ -1e4: relative accuracy of fp32 (of bf16 inputs, computed in fp32)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-3)
    # the gradient scales with 1 / T and (z - lse) with |z| ~ 1e4, whose fp32 spacing is ~1e-3: the error is
    # relative to the largest entry (a conditioning limit shared by every fp32 implementation)
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3  # cpp multiplies by 1 / T, torch divides by T: 1 ulp of z
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=tol * float(ref_grad.abs().max()))


@pytest.mark.parametrize("case", ["magnitude 1e4", "temperature 1e-4"])
def test_fused_losses_stay_finite_with_huge_logits(backend, case):
    scale, temperature = (1e4, 1.0) if case == "magnitude 1e4" else (1.0, 1e-4)
    config = CalibRLConfig(temperature=temperature)
    logits, targets = _problem(6, scale)
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(7)) * scale**0.5
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(8)) * scale**0.5
    args = _loss_inputs()
    mask = torch.ones(B, T)
    x, h, w = (
        logits.clone().requires_grad_(True),
        hidden.clone().requires_grad_(True),
        weight.clone().requires_grad_(True),
    )
    fused = ck.fused_calibrl_loss(x, targets, mask=mask, config=config, **args)
    linear = ck.fused_linear_calibrl_loss(h, w, targets, mask=mask, config=config, **args)
    (fused.loss + linear.loss).backward()
    for out in (fused, linear):
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.metrics().values())
    assert torch.isfinite(x.grad).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}
    ref = reference.fused_calibrl_loss(logits.double(), targets, mask=mask.double(), config=config, **d)
    torch.testing.assert_close(fused.loss.double(), ref.loss, rtol=1e-4, atol=1e-4)


def test_group_edge_cases_have_defined_advantages(backend):
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5])  # group 0: zero variance; group 1: one row; group 2: + expert
    groups = torch.tensor([0, 0, 1, 2, 2])
    is_expert = torch.tensor([False, False, False, False, True])
    for norm_by_std in (False, True):
        stats = ck.group_advantages(rewards, groups, is_expert=is_expert, norm_by_std=norm_by_std)
        assert torch.isfinite(stats.advantages).all()
        assert (stats.advantages[:3] == 0).all()  # zero-variance group and group of one: no signal, no NaN
    with pytest.raises(ValueError, match="expert rows only"):
        ck.group_advantages(rewards, torch.tensor([0, 0, 1, 1, 2]), is_expert=is_expert)
