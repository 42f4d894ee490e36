"""Torch reference of the CalibRL loss (and GRPO / DAPO / Dr.GRPO / LUFFY / RL-PLUS): the semantics every fused
backend reproduces, the aggregation modes, and the autograd oracle of the gradient coefficients.

Written for clarity and exactness, not speed: logits are materialised, autograd provides the gradients.
Computation is in float32 (float64 when the main input is float64, so ``gradcheck`` and 1e-10 comparisons
against hand-computed values work). Inputs are not checked here (``calibrl_kernels.ops`` does that).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import (
    AGG_EPS,
    DEFAULT_CONFIG,
    LOG_RATIO_CLAMP,
    LUFFY_SHAPING_GAMMA,
    RLPLUS_FOCAL_POWER,
    RLPLUS_MIX,
    RLPLUS_OLD_WEIGHT,
    CalibRLConfig,
    LossOutput,
)
from .logprobs import compute_dtype, linear_logits, token_logprobs


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, loss_scale_factor: Optional[float] = None
) -> torch.Tensor:
    """Reduce a (B, T) token term to a scalar over the tokens where mask != 0.

    token-mean:              sum(m * l) / (sum(m) + 1e-8)
    seq-mean-token-mean:     mean over rows with any token of sum_t(m * l) / (sum_t m + 1e-8)
    seq-mean-token-sum:      mean over rows with any token of sum_t(m * l)
    seq-mean-token-sum-norm: seq-mean-token-sum / loss_scale_factor (default T, the padded length)
    Rows without tokens are left out of the row mean (as in current verl).
    """
    m = mask.to(loss_mat.dtype)
    masked = torch.where(m != 0, loss_mat * m, torch.zeros_like(loss_mat))  # guard inf/nan at padding
    if mode == "token-mean":
        return masked.sum() / (m.sum() + AGG_EPS)
    row_tokens = m.sum(-1)  # (B,)
    num_rows = (row_tokens > 0).sum().clamp_min(1).to(loss_mat.dtype)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / (row_tokens + AGG_EPS)).sum() / num_rows
    seq_mean_token_sum = masked.sum() / num_rows
    if mode == "seq-mean-token-sum":
        return seq_mean_token_sum
    if mode == "seq-mean-token-sum-norm":
        return seq_mean_token_sum / (loss_scale_factor if loss_scale_factor is not None else m.shape[-1])
    raise ValueError(
        f"loss_agg_mode: expected one of token-mean, seq-mean-token-mean, seq-mean-token-sum, "
        f"seq-mean-token-sum-norm, got {mode!r}"
    )


def aggregation_weights(
    mask: torch.Tensor, mode: str, loss_scale_factor: Optional[float] = None, dtype=torch.float32
) -> torch.Tensor:
    """Per-token weights c (B, T) with aggregate(l, mask, mode) == sum(c * l).

    They depend on the mask only, so fused kernels know the normaliser of every token before launch.
    """
    m = mask.to(dtype)
    if mode == "token-mean":
        return m / (m.sum() + AGG_EPS)
    row_tokens = m.sum(-1, keepdim=True)  # (B, 1)
    num_rows = (row_tokens > 0).sum().clamp_min(1).to(dtype)
    if mode == "seq-mean-token-mean":
        return m / (row_tokens + AGG_EPS) / num_rows
    if mode == "seq-mean-token-sum":
        return m / num_rows
    if mode == "seq-mean-token-sum-norm":
        return m / num_rows / (loss_scale_factor if loss_scale_factor is not None else m.shape[-1])
    raise ValueError(
        f"loss_agg_mode: expected one of token-mean, seq-mean-token-mean, seq-mean-token-sum, "
        f"seq-mean-token-sum-norm, got {mode!r}"
    )


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(m * v) / (sum(m) + 1e-8), detached: the metric mean of the authors' code."""
    return aggregate(values.detach(), mask, "token-mean")


# --------------------------------------------------------------------------------------------
# Token terms of the loss
# --------------------------------------------------------------------------------------------
def guide_activation(z: torch.Tensor, config: CalibRLConfig) -> torch.Tensor:
    """act(z) of the calibration term; leaky_relu(alpha) is CalibRL, the rest are the paper's ablation.

    "huber" is the Huber function of z (quadratic within +-huber_delta, linear outside): a symmetric
    pull of lp towards the baseline, our reading of the paper's Huber ablation.
    """
    if config.activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope=config.negative_slope)
    if config.activation == "relu":
        return F.relu(z)
    if config.activation == "tanh":
        return torch.tanh(z)
    if config.activation == "sigmoid":
        return torch.sigmoid(z)
    if config.activation == "huber":
        return F.huber_loss(z, torch.zeros_like(z), reduction="none", delta=config.huber_delta)
    raise ValueError(f"activation {config.activation!r} has no token term")


def ppo_token_terms(lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, config: CalibRLConfig):
    """PPO dual-clip term per token and the two clip indicators (all (B, T)).

    rho = exp(clamp(lp - old_lp, +-20)); l1 = -A rho; l2 = -A clamp(rho, 1-eps_low, 1+eps_high);
    lc = max(l1, l2); l_pg = min(lc, -c A) where A < 0 else lc.
    """
    ratio = torch.exp(torch.clamp(lp - old_lp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    lc = torch.maximum(l1, l2)
    l3 = -config.dual_clip_bound * adv
    negative = adv < 0
    l_pg = torch.where(negative, torch.minimum(lc, l3), lc)
    clipped = l2 > l1
    clipped_lower = (lc > l3) & negative
    return l_pg, clipped, clipped_lower


def expert_token_term(lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, mode: str) -> torch.Tensor:
    """The hybrid baselines' term on expert tokens (B, T).

    luffy:  -A * p / (p + 0.1),                          p = exp(lp)
    rlplus: -A * 2p / (1.5 p_old + 0.5) * (1 - sg(p))^0.5, p_old = exp(old_lp)
    """
    p = torch.exp(lp)
    if mode == "luffy":
        return -adv * p / (p + LUFFY_SHAPING_GAMMA)
    if mode == "rlplus":
        p_old = torch.exp(old_lp)
        focal = (1.0 - p.detach()).clamp_min(0.0) ** RLPLUS_FOCAL_POWER
        return -adv * 2.0 * p / (RLPLUS_OLD_WEIGHT * p_old + RLPLUS_MIX) * focal
    raise ValueError(f"mode {mode!r} has no expert-token term")


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def calibrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    config: CalibRLConfig = DEFAULT_CONFIG,
) -> LossOutput:
    """The CalibRL loss (and the baselines') from per-token log-probs; see docs/method.md sections 2-4.

    logp, old_logp, mask (B, T); advantages (B,) or (B, T); expert_logp (B, T) or (B,);
    passed, is_expert (B,) bool; entropy (B, T); expert_mask (B, T) (for mask_beyond_expert).
    """
    dt = compute_dtype(logp)
    B, T = logp.shape
    lp = logp.to(dt)
    old_lp = old_logp.detach().to(dt)
    m = mask.to(dt)  # (B, T)
    adv = advantages.detach().to(dt)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv  # (B, T)
    expert_rows = torch.zeros(B, dtype=torch.bool, device=lp.device) if is_expert is None else is_expert  # (B,)
    expert_tokens = expert_rows[:, None].expand(B, T)  # (B, T)
    on_policy_m = m * (~expert_rows)[:, None].to(dt)  # (B, T) on-policy tokens
    loss_m = m if config.keeps_expert_rows else on_policy_m  # (B, T) tokens the loss counts

    def agg(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return aggregate(values, token_mask, config.loss_agg_mode, config.loss_scale_factor)

    # Tokens outside a term's mask are not used by it: their inputs (advantage, old_logp, baseline, logp) may
    # hold anything, NaN included. aggregate() keeps them out of the values; lp_for() keeps them out of the
    # gradient (autograd would form 0 * NaN = NaN there: d(-A rho)/d rho = -A even where the term is dropped).
    def lp_for(term_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(term_mask != 0, lp, lp.detach())

    lp_loss = lp_for(loss_m)
    l_ppo, clipped, clipped_lower = ppo_token_terms(lp_loss, old_lp, adv, config)
    if config.keeps_expert_rows:
        l_pg = torch.where(expert_tokens, expert_token_term(lp_loss, old_lp, adv, config.mode), l_ppo)
    else:
        l_pg = l_ppo
    pg_loss = agg(l_pg, loss_m)
    loss = pg_loss

    if config.uses_guide:
        b = expert_logp.detach().to(dt)
        b = b[:, None].expand(B, T) if b.dim() == 1 else b  # (B, T)
        s = torch.where(passed, 1.0, -1.0).to(dt)[:, None]  # (B, 1) +1 passed, -1 failed
        w = adv.abs() if config.weight_by_advantage else torch.ones_like(adv)
        guide_m = on_policy_m * (expert_mask != 0).to(dt) if config.mask_beyond_expert else on_policy_m
        z = -s * (lp_for(guide_m) - b)  # (B, T)
        guide_loss = agg(w * guide_activation(z, config), guide_m)
        loss = loss + config.guide_coef * guide_loss
    else:
        guide_loss = torch.zeros((), dtype=dt, device=lp.device)

    if entropy is not None:
        ent = entropy.to(dt)
        if config.entropy_coef != 0.0:
            loss = loss - config.entropy_coef * agg(ent, loss_m)
        entropy_metric = masked_token_mean(ent, on_policy_m)
    else:
        entropy_metric = torch.full((), float("nan"), dtype=dt, device=lp.device)

    return LossOutput(
        loss=loss,
        pg_loss=pg_loss.detach(),
        guide_loss=guide_loss.detach(),
        entropy=entropy_metric,
        clipfrac=masked_token_mean(clipped.to(dt), m),
        clipfrac_lower=masked_token_mean(clipped_lower.to(dt), m),
        ppo_kl=masked_token_mean(old_lp - lp.detach(), m),
    )


def fused_calibrl_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    config: CalibRLConfig = DEFAULT_CONFIG,
    inplace_backward: bool = False,
) -> LossOutput:
    """Reference twin of the fused op: explicit log-softmax of logits (B, T, V), then calibrl_loss.

    Tokens whose target is ignore_index are left out of the loss (as if masked); masked tokens (mask 0) are
    treated as ignored before the log-softmax, so their logits are never read (zero gradient even for NaN
    logits, as in the fused backends).
    inplace_backward: accepted for signature parity with the fused backends, which may then write the
    gradient over the logits buffer; the reference never does (the logits' content after backward is
    unspecified under that option, so callers must not rely on it either way).
    """
    targets = targets.long()  # compared as integers (see token_logprobs)
    read = (mask != 0) & (targets != ignore_index)  # (B, T) tokens whose logits the loss uses
    logp, entropy = token_logprobs(
        logits,
        torch.where(read, targets, torch.full_like(targets, ignore_index)),
        config.temperature,
        ignore_index,
        return_entropy=True,
    )
    token_mask = mask.to(logp.dtype) * read.to(logp.dtype)
    fields = dict(expert_logp=expert_logp, passed=passed, is_expert=is_expert, expert_mask=expert_mask)
    return calibrl_loss(logp, old_logp, advantages, token_mask, entropy=entropy, config=config, **fields)


def fused_linear_calibrl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    config: CalibRLConfig = DEFAULT_CONFIG,
) -> LossOutput:
    """Reference twin of the linear fused op: logits = hidden (B, T, D) @ weight (V, D)^T + bias."""
    logits = linear_logits(hidden, weight, bias)
    fields = dict(expert_logp=expert_logp, passed=passed, is_expert=is_expert, expert_mask=expert_mask)
    return fused_calibrl_loss(
        logits, targets, old_logp, advantages, mask, ignore_index=ignore_index, config=config, **fields
    )


def gradient_coefficients(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    config: CalibRLConfig = DEFAULT_CONFIG,
) -> Tuple[LossOutput, torch.Tensor, torch.Tensor]:
    """The loss and the two per-token coefficients that define its gradient w.r.t. the logits.

    a = -dL/dlp and b = -dL/dH (both (B, T), compute dtype). For a token with scaled logits
    z = logits / temperature, target y, p = softmax(z):
        dL/dz_j = a (p_j - [j = y]) + b p_j (z_j - lse + H),   dL/dlogits = dL/dz / temperature.
    Obtained here by autograd on the reference loss; fused kernels compute the same numbers in closed
    form, and tests compare the two.
    """
    lp = logp.detach().to(compute_dtype(logp)).requires_grad_(True)
    ent = entropy.detach().to(lp.dtype).requires_grad_(True)
    fields = dict(expert_logp=expert_logp, passed=passed, is_expert=is_expert, expert_mask=expert_mask)
    out = calibrl_loss(lp, old_logp, advantages, mask, entropy=ent, config=config, **fields)
    d_lp, d_ent = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True)
    d_lp = torch.zeros_like(lp) if d_lp is None else d_lp
    d_ent = torch.zeros_like(ent) if d_ent is None else d_ent
    return out._replace(loss=out.loss.detach()), -d_lp, -d_ent
