"""Closed-form per-token terms of the CalibRL loss and the two coefficients of its logit gradient.

The loss depends on a token's logits only through its log-prob ``lp`` and entropy ``H``, so once lp
and H of a row are known, everything else is a handful of scalar formulas per token:

* its contributions to loss / pg_loss / guide_loss / the entropy term and to the metrics,
* ``a = -dL/dlp`` and ``b = -dL/dH``, from which the gradient w.r.t. the row's logits follows as
  ``dL/dz_j = a (p_j - [j = y]) + b p_j (z_j - lse + H)``.

The aggregation weights ``c`` (``reference.aggregation_weights``: ``agg(l) = sum(c * l)``) depend on
the mask only, so they are computed before any vocabulary work and each token's contribution is
``c * l``. Every formula here reproduces what autograd gives on ``reference.calibrl_loss``, ties
included: torch.maximum / torch.minimum split the gradient in halves on ties, clamp passes the
gradient at its bounds, leaky_relu uses the slope at 0, relu gives 0 at 0, masked tokens get 0
even where the local derivative is not finite. ``reference.gradient_coefficients`` (autograd) is
the test oracle.

Fused implementations work on flat token tables so that a row chunk needs only slices:
``token_table`` packs the per-token inputs (TOKEN_FIELDS, one row per token) and every row kernel
fills a row table (ROW_FIELDS). The C++ kernels (cpu/csrc/cpu_ops.h) use the same column layout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..config import DEFAULT_CONFIG, LOG_RATIO_CLAMP, LUFFY_SHAPING_GAMMA, CalibRLConfig, LossInputs, LossOutput
from .logprobs import compute_dtype
from .loss import aggregation_weights, expert_token_term

# Columns of the token table (N, len(TOKEN_FIELDS)): per-token inputs of the loss, compute dtype.
TOKEN_FIELDS = (
    "old_logp",  # log-prob under the sampling policy
    "advantage",  # A of the token (its row's advantage, or per-token advantages)
    "baseline",  # expert baseline b (0 when the loss has no guide term)
    "sign",  # s = +1 for a passed row, -1 otherwise (0 when the loss has no guide term)
    "guide_weight",  # w = |A| (weight_by_advantage) or 1
    "expert",  # 1.0 on expert rows, else 0.0
    "c_loss",  # aggregation weight of the policy and entropy terms (0 on tokens the loss drops)
    "c_guide",  # aggregation weight of the guide term
    "c_entropy_metric",  # weight of the entropy metric (token mean over on-policy tokens)
    "c_all",  # weight of clipfrac / clipfrac_lower / ppo_kl (token mean over every token)
)
# Columns of the row table (N, len(ROW_FIELDS)) that row kernels fill.
ROW_FIELDS = (
    "logp",  # log softmax(z)[y] (0 for ignored targets)
    "entropy",  # H = lse - sum_j p_j z_j (0 for ignored targets)
    "lse",  # log-sum-exp of z = logits / temperature
    "row_max",  # max of the raw logits (C++ kernels: their gradient forms log p from the shifted logits)
    "log_sum",  # log sum_j exp((logits_j - row_max) / temperature) (C++ kernels, with row_max)
    "coef_a",  # a = -dL/dlp
    "coef_b",  # b = -dL/dH
    "pg",  # c_loss * l_pg: summed, pg_loss
    "guide",  # c_guide * w * act(z): summed, guide_loss
    "entropy_loss",  # c_loss * H: summed, agg(H) of the entropy bonus
    "entropy_metric",  # c_entropy_metric * H: summed, the entropy metric
    "clipfrac",  # c_all * (l2 > l1)
    "clipfrac_lower",  # c_all * ((lc > -c A) & (A < 0))
    "ppo_kl",  # c_all * (old_lp - lp)
)
TOKEN = {name: i for i, name in enumerate(TOKEN_FIELDS)}
ROW = {name: i for i, name in enumerate(ROW_FIELDS)}
# The row-table columns holding per-token contributions (summed over tokens for the LossOutput).
TERM_FIELDS = ROW_FIELDS[ROW["pg"] :]


class TokenWeights(NamedTuple):
    """Aggregation weights (B, T): agg(l) = sum(c * l) for every aggregate the loss takes."""

    loss: torch.Tensor  # policy term and entropy bonus, over the tokens the loss counts
    guide: torch.Tensor  # guide term, over on-policy tokens (within the expert's length if asked)
    entropy_metric: torch.Tensor  # token mean over on-policy tokens
    all_tokens: torch.Tensor  # token mean over every token (clipfrac, clipfrac_lower, ppo_kl)


def token_weights(
    mask: torch.Tensor,
    is_expert: Optional[torch.Tensor],
    expert_mask: Optional[torch.Tensor],
    config: CalibRLConfig,
    dtype: torch.dtype,
) -> TokenWeights:
    """The weights of ``reference.calibrl_loss``'s aggregates; mask (B, T) already excludes ignored targets."""
    m = mask.to(dtype)  # (B, T)
    B, T = m.shape
    if is_expert is None:
        on_policy_m = m
    else:
        on_policy_m = m * (~is_expert)[:, None].to(dtype)  # (B, T)
    loss_m = m if config.keeps_expert_rows else on_policy_m
    agg_mode, scale = config.loss_agg_mode, config.loss_scale_factor
    loss_c = aggregation_weights(loss_m, agg_mode, scale, dtype)
    if not config.uses_guide:
        guide_c = torch.zeros_like(m)
    elif config.mask_beyond_expert:
        guide_c = aggregation_weights(on_policy_m * (expert_mask != 0).to(dtype), agg_mode, scale, dtype)
    else:
        guide_c = aggregation_weights(on_policy_m, agg_mode, scale, dtype)
    return TokenWeights(
        loss=loss_c,
        guide=guide_c,
        entropy_metric=aggregation_weights(on_policy_m, "token-mean", None, dtype),
        all_tokens=aggregation_weights(m, "token-mean", None, dtype),
    )


def token_table(inputs: LossInputs, config: CalibRLConfig, dtype: torch.dtype) -> torch.Tensor:
    """Pack the per-token inputs of the loss into a (B*T, len(TOKEN_FIELDS)) table of ``dtype``.

    inputs.old_logp, inputs.mask (B, T): the mask already zero at ignored targets (inputs.ignore_index is
    not read; ``loss_token_table`` applies it); advantages (B,) or (B, T); expert_logp (B,) or (B, T);
    passed, is_expert (B,) bool; expert_mask (B, T).
    """
    old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, _ = inputs
    B, T = old_logp.shape
    device = old_logp.device

    def per_token(t: torch.Tensor) -> torch.Tensor:  # (B,) or (B, T) -> (B, T) in dtype
        t = t.detach().to(dtype)
        return t[:, None].expand(B, T) if t.dim() == 1 else t

    table = torch.zeros(B, T, len(TOKEN_FIELDS), dtype=dtype, device=device)
    adv = per_token(advantages)
    table[..., TOKEN["old_logp"]] = per_token(old_logp)
    table[..., TOKEN["advantage"]] = adv
    if config.uses_guide:
        table[..., TOKEN["baseline"]] = per_token(expert_logp)
        table[..., TOKEN["sign"]] = per_token(torch.where(passed, 1.0, -1.0))
        table[..., TOKEN["guide_weight"]] = adv.abs() if config.weight_by_advantage else 1.0
    if is_expert is not None:
        table[..., TOKEN["expert"]] = per_token(is_expert)
    weights = token_weights(mask, is_expert, expert_mask, config, dtype)
    table[..., TOKEN["c_loss"]] = weights.loss
    table[..., TOKEN["c_guide"]] = weights.guide
    table[..., TOKEN["c_entropy_metric"]] = weights.entropy_metric
    table[..., TOKEN["c_all"]] = weights.all_tokens
    return table.view(B * T, len(TOKEN_FIELDS))


def loss_token_table(
    targets: torch.Tensor, inputs: LossInputs, config: CalibRLConfig, dtype: torch.dtype
) -> torch.Tensor:
    """``token_table`` of the loss mask with the ignore_index targets removed (every fused backend's table).

    targets (B, T); tokens whose target is ignore_index leave the loss, as in the reference.
    """
    token_mask = inputs.mask.to(dtype) * (targets != inputs.ignore_index).to(dtype)  # (B, T)
    return token_table(inputs._replace(mask=token_mask), config, dtype)


# --------------------------------------------------------------------------------------------
# Closed-form token terms
# --------------------------------------------------------------------------------------------
def _tie_share(x: torch.Tensor, other: torch.Tensor, wins) -> torch.Tensor:
    """Share of the gradient autograd gives x in max/min(x, other): 1 if x wins, 1/2 on a tie, else 0."""
    return torch.where(wins(x, other), 1.0, torch.where(x == other, 0.5, 0.0)).to(x.dtype)


def _inside(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Where clamp(x, low, high) passes the gradient: low <= x <= high (bounds included, as torch)."""
    return ((x >= low) & (x <= high)).to(x.dtype)


def ppo_term_and_slope(lp, old_lp, adv, config: CalibRLConfig):
    """The PPO dual-clip term, d l_pg / d lp, and the two clip indicators (any equal shapes).

    Mirrors reference.ppo_token_terms: rho = exp(clamp(lp - old_lp, +-20)), l1 = -A rho,
    l2 = -A clamp(rho, 1 - eps_low, 1 + eps_high), lc = max(l1, l2), l_pg = min(lc, -c A) if A < 0.
    """
    log_ratio = lp - old_lp
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    d_ratio = ratio * _inside(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # d rho / d lp
    low, high = 1.0 - config.clip_low, 1.0 + config.clip_high
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, low, high)
    lc = torch.maximum(l1, l2)
    l3 = -config.dual_clip_bound * adv
    negative = adv < 0
    l_pg = torch.where(negative, torch.minimum(lc, l3), lc)
    # d lc / d rho: -A through l1, -A * [low <= rho <= high] through l2, split by the max's tie rule.
    d_lc = -adv * (_tie_share(l1, l2, torch.gt) + _tie_share(l2, l1, torch.gt) * _inside(ratio, low, high))
    d_pg = torch.where(negative, _tie_share(lc, l3, torch.lt), 1.0) * d_lc * d_ratio
    return l_pg, d_pg, l2 > l1, (lc > l3) & negative


def expert_term_and_slope(lp, old_lp, adv, mode: str):
    """The luffy / rlplus expert-token term (reference.expert_token_term itself) and its derivative w.r.t. lp."""
    term = expert_token_term(lp, old_lp, adv, mode)  # raises for a mode without an expert-token term
    if mode == "luffy":  # -A p / (p + gamma)
        p = torch.exp(lp)
        return term, -adv * LUFFY_SHAPING_GAMMA * p / (p + LUFFY_SHAPING_GAMMA) ** 2
    return term, term  # rlplus: linear in p (its focal factor is a stop-gradient) and dp/dlp = p


def guide_activation_and_slope(z, config: CalibRLConfig):
    """act(z) of the guide term and act'(z), with torch's values at the kinks."""
    if config.activation == "leaky_relu":
        return torch.where(z > 0, z, z * config.negative_slope), torch.where(z > 0, 1.0, config.negative_slope).to(
            z.dtype
        )
    if config.activation == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    if config.activation == "tanh":
        y = torch.tanh(z)
        return y, 1.0 - y * y
    if config.activation == "sigmoid":
        y = torch.sigmoid(z)
        return y, (1.0 - y) * y
    if config.activation == "huber":
        delta = config.huber_delta
        size = z.abs()
        value = torch.where(size < delta, 0.5 * z * z, delta * (size - 0.5 * delta))
        return value, torch.clamp(z, -delta, delta)
    raise ValueError(f"activation {config.activation!r} has no token term")


class TokenTerms(NamedTuple):
    """Per-token results (all the shape of lp); contributions are already weighted by c."""

    coef_a: torch.Tensor  # a = -dL/dlp
    coef_b: torch.Tensor  # b = -dL/dH
    pg: torch.Tensor  # c_loss * l_pg
    guide: torch.Tensor  # c_guide * w * act(z)
    entropy_loss: torch.Tensor  # c_loss * H
    entropy_metric: torch.Tensor  # c_entropy_metric * H
    clipfrac: torch.Tensor  # c_all * (l2 > l1)
    clipfrac_lower: torch.Tensor  # c_all * ((lc > -c A) & (A < 0))
    ppo_kl: torch.Tensor  # c_all * (old_lp - lp)


def _weighted(c: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """c * values, and exactly 0 where c == 0 (as reference.aggregate guards padding)."""
    return torch.where(c != 0, c * values, torch.zeros_like(values))


def token_terms(lp: torch.Tensor, entropy: torch.Tensor, table: torch.Tensor, config: CalibRLConfig) -> TokenTerms:
    """Closed-form contributions and gradient coefficients of tokens (n,) from their token table (n, K)."""
    col = lambda name: table[:, TOKEN[name]]  # noqa: E731
    old_lp, adv = col("old_logp"), col("advantage")
    c_loss, c_guide = col("c_loss"), col("c_guide")
    l_pg, d_pg, clipped, clipped_lower = ppo_term_and_slope(lp, old_lp, adv, config)
    if config.keeps_expert_rows:
        expert = col("expert") != 0
        e_term, e_slope = expert_term_and_slope(lp, old_lp, adv, config.mode)
        l_pg = torch.where(expert, e_term, l_pg)
        d_pg = torch.where(expert, e_slope, d_pg)
    d_loss_d_lp = _weighted(c_loss, d_pg)
    if config.uses_guide:
        sign = col("sign")
        act, slope = guide_activation_and_slope(-sign * (lp - col("baseline")), config)
        weight = col("guide_weight")
        guide = _weighted(c_guide, weight * act)
        d_loss_d_lp = d_loss_d_lp + config.guide_coef * _weighted(c_guide, weight * slope * -sign)
    else:
        guide = torch.zeros_like(lp)
    entropy_loss = _weighted(c_loss, entropy)
    coef_b = (
        config.entropy_coef * _weighted(c_loss, torch.ones_like(lp))
        if config.entropy_coef != 0.0
        else torch.zeros_like(lp)
    )
    c_all = col("c_all")
    return TokenTerms(
        coef_a=-d_loss_d_lp,
        coef_b=coef_b,
        pg=_weighted(c_loss, l_pg),
        guide=guide,
        entropy_loss=entropy_loss,
        entropy_metric=_weighted(col("c_entropy_metric"), entropy),
        clipfrac=_weighted(c_all, clipped.to(lp.dtype)),
        clipfrac_lower=_weighted(c_all, clipped_lower.to(lp.dtype)),
        ppo_kl=_weighted(c_all, old_lp - lp),
    )


def fill_row_terms(row_table: torch.Tensor, table: torch.Tensor, config: CalibRLConfig) -> None:
    """Row-table columns coef_a .. ppo_kl from its logp / entropy columns and the token table (in place)."""
    terms = token_terms(row_table[:, ROW["logp"]], row_table[:, ROW["entropy"]], table, config)
    for name in ("coef_a", "coef_b") + TERM_FIELDS:
        row_table[:, ROW[name]] = getattr(terms, name)


def loss_output(term_sums: torch.Tensor, config: CalibRLConfig) -> LossOutput:
    """The LossOutput from the sums over tokens of the row table's TERM_FIELDS columns (len(TERM_FIELDS),)."""
    s = {name: term_sums[i] for i, name in enumerate(TERM_FIELDS)}
    loss = s["pg"]
    guide_loss = s["guide"] if config.uses_guide else torch.zeros_like(s["guide"])
    if config.uses_guide:
        loss = loss + config.guide_coef * guide_loss
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * s["entropy_loss"]
    return LossOutput(
        loss=loss,
        pg_loss=s["pg"],
        guide_loss=guide_loss,
        entropy=s["entropy_metric"],
        clipfrac=s["clipfrac"],
        clipfrac_lower=s["clipfrac_lower"],
        ppo_kl=s["ppo_kl"],
    )


def closed_form_coefficients(
    logp: torch.Tensor, entropy: torch.Tensor, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG
):
    """The closed-form twin of ``reference.gradient_coefficients``: (LossOutput, a (B, T), b (B, T)).

    logp, entropy (B, T); inputs: the loss's other tensors (inputs.mask is the token mask, as in
    ``token_table``), which ``gradient_coefficients`` takes as separate arguments.
    """
    dtype = compute_dtype(logp)
    B, T = logp.shape
    table = token_table(inputs, config, dtype)
    terms = token_terms(logp.detach().to(dtype).reshape(-1), entropy.detach().to(dtype).reshape(-1), table, config)
    sums = torch.stack([getattr(terms, name).sum() for name in TERM_FIELDS])
    return loss_output(sums, config), terms.coef_a.view(B, T), terms.coef_b.view(B, T)
