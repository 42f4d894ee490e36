"""Closed-form loss terms and gradient coefficients (calibrl_kernels.reference.coefficients) vs autograd on the
reference."""

import pytest
import torch
from _cpu_helpers import CONFIGS, assert_loss_outputs_close, make_batch, token_values_with_ties

from calibrl_kernels import reference
from calibrl_kernels.config import CalibRLConfig
from calibrl_kernels.reference import coefficients


def _assert_closed_form_matches_autograd(
    logp, entropy, batch, config, advantages=None, rtol=1e-12, atol=1e-15, loss_rtol=1e-12, loss_atol=1e-14
):
    """closed_form_coefficients against reference.gradient_coefficients: the loss outputs, a and b.

    Returns the closed form's (LossOutput, a, b)."""
    inputs = batch.inputs()._replace(advantages=batch.advantages if advantages is None else advantages)
    out, a, b = coefficients.closed_form_coefficients(logp, entropy, inputs, config)
    args = (logp, entropy, inputs.old_logp, inputs.advantages, inputs.mask)
    ref_out, ref_a, ref_b = reference.gradient_coefficients(*args, config=config, **inputs.optional_fields())
    assert_loss_outputs_close(out, ref_out, rtol=loss_rtol, atol=loss_atol, what=config.mode)
    torch.testing.assert_close(a, ref_a, rtol=rtol, atol=atol)
    torch.testing.assert_close(b, ref_b, rtol=rtol, atol=atol)
    return out, a, b


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_autograd_fp64_with_ties(name):
    config = CONFIGS[name]
    batch = make_batch(3, 3, 11, config=config, seed=hash(name) % 1000)
    logp, entropy = token_values_with_ties(batch)
    out, a, b = _assert_closed_form_matches_autograd(logp, entropy, batch, config)
    assert a.abs().sum() > 0, "the test batch should produce non-zero gradients"


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "huber", "tanh", "sigmoid"])
def test_kinks_use_torch_subgradients(activation):
    """z = 0 exactly (leaky_relu: slope, relu: 0) and |z| = delta (huber) on every unmasked token."""
    config = CalibRLConfig(activation=activation, guide_coef=1.0, loss_agg_mode="seq-mean-token-sum")
    batch = make_batch(2, 2, 6, config=config)
    baseline = batch.expert_logp
    for offset in (0.0, 1.0, -1.0):
        logp = baseline + offset
        _assert_closed_form_matches_autograd(logp, torch.zeros_like(logp), batch, config)


def test_clamp_bounds_pass_gradient_and_max_ties_split():
    """clip_low = clip_high = 0: ratio 1 sits on both clamp bounds; l1 == l2 everywhere (a tie)."""
    config = CalibRLConfig(mode="grpo", clip_low=0.0, clip_high=0.0)
    batch = make_batch(2, 3, 5, config=config)
    logp = batch.old_logp.clone()
    _assert_closed_form_matches_autograd(logp, torch.ones_like(logp), batch, config)


def test_dual_clip_tie_splits_gradient():
    """lc == -c A exactly (rho == c with no clipping active) gives half the gradient, as torch.minimum."""
    config = CalibRLConfig(mode="dapo", clip_high=10.0, dual_clip_c=2.0)
    batch = make_batch(2, 3, 4, config=config)
    advantages = -torch.ones_like(batch.advantages)
    logp = batch.old_logp + torch.log(torch.tensor(2.0, dtype=torch.float64))
    ratio = torch.exp(logp - batch.old_logp)
    assert bool((ratio == 2.0).any()), "some tokens should hit the tie exactly"
    _assert_closed_form_matches_autograd(logp, torch.ones_like(logp), batch, config, advantages)


def test_per_token_advantages_and_all_masked():
    config = CalibRLConfig(entropy_coef=0.1)
    batch = make_batch(2, 2, 5, config=config, all_masked=True)
    logp, entropy = token_values_with_ties(batch)
    adv = torch.randn(logp.shape, dtype=torch.float64)
    out, a, b = _assert_closed_form_matches_autograd(logp, entropy, batch, config, adv)
    assert float(a.abs().sum()) == 0.0 and float(b.abs().sum()) == 0.0


def test_fp32_inputs_match_fp32_reference():
    config = CONFIGS["calibrl-options"]
    batch = make_batch(3, 4, 9, config=config, dtype=torch.float32)
    logp, entropy = token_values_with_ties(batch, dtype=torch.float32)
    tolerances = dict(rtol=1e-5, atol=1e-7, loss_rtol=1e-5, loss_atol=1e-6)
    out, a, b = _assert_closed_form_matches_autograd(logp, entropy, batch, config, **tolerances)
    assert out.loss.dtype == torch.float32 and a.dtype == torch.float32


def test_table_layout_is_consistent():
    assert len(set(coefficients.TOKEN_FIELDS)) == len(coefficients.TOKEN_FIELDS)
    assert coefficients.TERM_FIELDS[0] == "pg" and coefficients.TERM_FIELDS[-1] == "ppo_kl"
