"""Torch reference of every public op: the semantics all fused implementations must reproduce.

Written for clarity and exactness, not speed: logits are materialised, autograd provides the
gradients. Computation is in float32 (float64 when the main input is float64, so ``gradcheck`` and
1e-10 comparisons against hand-computed values work). These functions do not check the types, shapes
or devices of their inputs (the public wrappers in ``calibrl_kernels.ops`` do, then dispatch here or to
a fused backend); only the value checks that need a computed quantity (a group without on-policy rows,
a group without exactly one expert) run here.

Formulas: ``../shared/CALIBRL.md`` (paper arXiv 2602.20197 and the authors' verl-based code).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks
from .config import (
    AGG_EPS,
    LOG_RATIO_CLAMP,
    LUFFY_SHAPING_GAMMA,
    RLPLUS_FOCAL_POWER,
    RLPLUS_MIX,
    RLPLUS_OLD_WEIGHT,
    CalibRLConfig,
    GroupStats,
    LossOutput,
)

_DEFAULT_CONFIG = CalibRLConfig()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 when given float64, float32 otherwise (bf16/fp16 inputs are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def representable_temperature(temperature: float, dtype: torch.dtype) -> float:
    """temperature clamped to the positive normal range of ``dtype`` (the compute dtype).

    Dividing an fp32 tensor by 1e300 divides by inf (the scalar is rounded to fp32), which turns a -inf
    logit into NaN; the clamped value gives the same logits / T wherever that quotient is representable
    (T = 1e300 gives the uniform distribution, as the fp64 reference does)."""
    info = torch.finfo(dtype)
    return min(max(float(temperature), info.tiny), info.max)


def inverse_temperature(temperature: float, dtype: torch.dtype = torch.float32) -> float:
    """1 / temperature clamped to the positive normal range of ``dtype``, for kernels that multiply by it:
    never 0 (x * 0 would turn a -inf logit into NaN) and never inf (it would turn a logit of 0 into NaN)."""
    info = torch.finfo(dtype)
    return min(max(1.0 / float(temperature), info.tiny), info.max)


# --------------------------------------------------------------------------------------------
# Token log-probs and entropy
# --------------------------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / temperature)[target] and the entropy of that distribution.

    logits (..., V), targets (...) -> logp (...) [, entropy (...)], float32 (float64 for float64 input).
    Positions whose target is ``ignore_index`` are not read: logp = entropy = 0 and an exactly zero
    gradient, whatever their logits hold (NaN padding included), as in the fused backends.
    Entries of -inf in the logits (a masked vocabulary) are allowed; a row whose logits are ALL -inf
    has no distribution, and a row holding a NaN or +inf logit none either: such a row's outputs and
    gradient are NaN (as torch's log_softmax), other rows are unaffected.
    """
    targets = targets.long()  # compared as integers: uint8 targets never wrap ignore_index (-100 -> 156)
    valid = targets != ignore_index  # (...)
    dt = compute_dtype(logits)
    z = logits.to(dt) / representable_temperature(temperature, dt)  # (..., V)
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros_like(z))  # ignored rows never read
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(z, dim=-1)  # (..., V)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    # H = -sum_j p_j log p_j: every term is >= 0 (log_softmax <= 0), so H >= 0 even where lse - sum_j p_j z_j
    # cancels (T = 1e-3: -2e-3); a -inf logit has p_j = 0 and contributes nothing (0 * -inf guarded, also in
    # the gradient); a NaN row stays NaN.
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden (..., D) @ weight (V, D)^T + bias (V,) in the compute dtype -> (..., V)."""
    dt = compute_dtype(hidden)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    return logits


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """token_logprobs of the lm_head logits, computed through explicit logits (the reference)."""
    return token_logprobs(linear_logits(hidden, weight, bias), targets, temperature, ignore_index, return_entropy)


# --------------------------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------------------------
def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: Optional[torch.Tensor] = None,
    norm_by_std: bool = False,
    eps: float = 1e-6,
    pass_threshold: float = 0.1,
    num_groups: Optional[int] = None,
) -> GroupStats:
    """Group mean / unbiased std / pass rate over on-policy rows, advantages for every row.

    scores (B,) rewards, group_ids (B,) any integers, is_expert (B,) bool or None (all on-policy).
    A group with one on-policy row uses mean 0 and std 1; a group with none raises ValueError.
    num_groups (optional): the number of distinct ids, checked (value check) here; fused backends use
    it to avoid a host synchronisation.
    """
    dt = compute_dtype(scores)
    r = scores.to(dt)  # (B,)
    on_policy = torch.ones_like(r, dtype=torch.bool) if is_expert is None else ~is_expert  # (B,)
    group_keys, group_index = torch.unique(group_ids, sorted=True, return_inverse=True)  # (G,), (B,)
    if num_groups is not None and _checks.value_checks_enabled():
        _checks.check_num_groups(num_groups, group_keys.numel())
    num_groups = group_keys.numel()
    on_f = on_policy.to(dt)

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:  # (B,) -> (G,)
        return torch.zeros(num_groups, dtype=values.dtype, device=r.device).index_add_(0, group_index, values)

    count = per_group_sum(on_policy.long())  # (G,)
    _checks.check_every_group_has_on_policy_rows(count, group_keys)
    count_f = count.to(dt)
    # Expert rows' scores are not read (where, not * on_f: a NaN expert score must not poison its group).
    zero = torch.zeros((), dtype=dt, device=r.device)
    raw_mean = per_group_sum(torch.where(on_policy, r, zero)) / count_f.clamp_min(1)  # (G,)
    deviation = torch.where(on_policy, r - raw_mean[group_index], zero)  # (B,) two-pass variance for accuracy
    raw_std = (per_group_sum(deviation * deviation) / (count_f - 1).clamp_min(1)).sqrt()
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(raw_mean), raw_mean)  # (G,)
    std = torch.where(single, torch.ones_like(raw_std), raw_std)  # (G,)
    passed = r > pass_threshold  # (B,)
    pass_rate = per_group_sum(passed.to(dt) * on_f) / count_f.clamp_min(1)  # (G,)
    advantages = r - mean[group_index]  # (B,)
    if norm_by_std:
        advantages = advantages / (std[group_index] + eps)
    return GroupStats(
        advantages=advantages,
        weights=advantages.abs(),
        passed=passed,
        mean=mean,
        std=std,
        pass_rate=pass_rate,
        count=count,
        group_index=group_index,
        group_keys=group_keys,
    )


def expert_baseline(
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    kind: str = "position",
    return_mask: bool = False,
):
    """The expert baseline b (B, T) of every row, from its group's expert row (exactly one per group).

    kind="position" (authors' code): b[i, t] = old_logp[e, t] of the group's expert row e, and 0 past
    the expert's length (mask[e, t] == 0). kind="sequence-mean": the expert's mean token log-prob,
    the same value at every t. With return_mask, also the expert's token mask mask[e] (B, T) bool,
    used by ``mask_beyond_expert``.
    """
    if kind not in ("position", "sequence-mean"):
        raise ValueError(f"kind: expected 'position' or 'sequence-mean', got {kind!r}")
    B, T = old_logp.shape
    dt = compute_dtype(old_logp)
    group_keys, group_index = torch.unique(group_ids, sorted=True, return_inverse=True)
    expert_count = torch.zeros(group_keys.numel(), dtype=torch.long, device=old_logp.device)
    expert_count.index_add_(0, group_index, is_expert.long())
    _checks.check_one_expert_per_group(expert_count, group_keys)
    rows = torch.arange(B, device=old_logp.device)
    expert_row_of_group = torch.zeros(group_keys.numel(), dtype=torch.long, device=old_logp.device)
    expert_row_of_group[group_index[is_expert]] = rows[is_expert]
    expert_row = expert_row_of_group[group_index]  # (B,) the expert row of each row's group
    expert_tokens = mask[expert_row] != 0  # (B, T)
    expert_old = old_logp.detach().to(dt)[expert_row]  # (B, T)
    zeros = torch.zeros_like(expert_old)
    if kind == "position":
        baseline = torch.where(expert_tokens, expert_old, zeros)
    else:
        m = expert_tokens.to(dt)
        seq_mean = (torch.where(expert_tokens, expert_old, zeros)).sum(-1) / m.sum(-1).clamp_min(1)  # (B,)
        baseline = seq_mean[:, None].expand(B, T).contiguous()
    return (baseline, expert_tokens) if return_mask else baseline


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, loss_scale_factor: Optional[float] = None) -> torch.Tensor:
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
    raise ValueError(f"loss_agg_mode: expected one of token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, got {mode!r}")


def aggregation_weights(mask: torch.Tensor, mode: str, loss_scale_factor: Optional[float] = None, dtype=torch.float32) -> torch.Tensor:
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
    raise ValueError(f"loss_agg_mode: expected one of token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, got {mode!r}")


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
    config: CalibRLConfig = _DEFAULT_CONFIG,
) -> LossOutput:
    """The CalibRL loss (and the baselines') from per-token log-probs; see CALIBRL.md sections 2-4.

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
    config: CalibRLConfig = _DEFAULT_CONFIG,
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
    logp, entropy = token_logprobs(logits, torch.where(read, targets, torch.full_like(targets, ignore_index)),
                                   config.temperature, ignore_index, return_entropy=True)
    token_mask = mask.to(logp.dtype) * read.to(logp.dtype)
    return calibrl_loss(
        logp, old_logp, advantages, token_mask, expert_logp=expert_logp, passed=passed, is_expert=is_expert,
        entropy=entropy, expert_mask=expert_mask, config=config,
    )


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
    config: CalibRLConfig = _DEFAULT_CONFIG,
) -> LossOutput:
    """Reference twin of the linear fused op: logits = hidden (B, T, D) @ weight (V, D)^T + bias."""
    return fused_calibrl_loss(
        linear_logits(hidden, weight, bias), targets, old_logp, advantages, mask, expert_logp=expert_logp,
        passed=passed, is_expert=is_expert, expert_mask=expert_mask, ignore_index=ignore_index, config=config,
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
    config: CalibRLConfig = _DEFAULT_CONFIG,
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
    out = calibrl_loss(
        lp, old_logp, advantages, mask, expert_logp=expert_logp, passed=passed, is_expert=is_expert,
        entropy=ent, expert_mask=expert_mask, config=config,
    )
    d_lp, d_ent = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True)
    d_lp = torch.zeros_like(lp) if d_lp is None else d_lp
    d_ent = torch.zeros_like(ent) if d_ent is None else d_ent
    return out._replace(loss=out.loss.detach()), -d_lp, -d_ent
