"""The CalibRL loss per token in closed form, and the per-token inputs / outputs of the loss kernels.

``calibrl_token_terms`` gives a token's policy term, guide term, metric flags and the two gradient
coefficients a = -dL/dlp and b = -dL/dH (see docs/design.md, "The single pass"). Ties (max/min of equal values,
clamp at its bounds) follow torch's autograd rules, so the kernels take the same branch as
``reference.gradient_coefficients`` at every tie and kink. ``loss_epilogue`` reads a token's inputs from the
token table and writes its outputs to the row table, in the layout of ``reference.coefficients`` that every
backend shares.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..config import (
    ACTIVATIONS,
    LOG_RATIO_CLAMP,
    LUFFY_SHAPING_GAMMA,
    MODES,
    ON_POLICY_ONLY_MODES,
    RLPLUS_FOCAL_POWER,
    RLPLUS_MIX,
    RLPLUS_OLD_WEIGHT,
    kernel_scalars,
)
from ..reference.coefficients import ROW, ROW_FIELDS, TERM_FIELDS, TOKEN, TOKEN_FIELDS

# Globals read inside kernels must be constexpr.
_LOG_RATIO_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
_LUFFY_GAMMA = tl.constexpr(LUFFY_SHAPING_GAMMA)
_RLPLUS_OLD_WEIGHT = tl.constexpr(RLPLUS_OLD_WEIGHT)
_RLPLUS_MIX = tl.constexpr(RLPLUS_MIX)
_RLPLUS_FOCAL_POWER = tl.constexpr(RLPLUS_FOCAL_POWER)


def _require(condition: bool, message: str) -> None:
    """Fail at import when config and the kernels' codes disagree (a new mode or activation without a kernel)."""
    if not condition:
        raise ImportError(f"calibrl_kernels Triton kernels out of date with config: {message}")


# The codes of the two constexpr switches of the loss kernels, defined here only (kernels compare
# against the constexpr mirrors below, launchers call ``policy_code`` / ``activation_code``).
# POLICY: the PPO dual clip on every loss token, or, for the modes that keep expert rows in the loss,
# their own term on expert tokens (PPO elsewhere).
POLICY_CODES = {"ppo": 0, "luffy": 1, "rlplus": 2}
_require(
    {mode for mode in MODES if mode not in ON_POLICY_ONLY_MODES} == set(POLICY_CODES) - {"ppo"},
    f"expert-token terms exist for {sorted(set(POLICY_CODES) - {'ppo'})}",
)
# ACTIVATION: the guide activation, one code per config.ACTIVATIONS entry that has a term ("none" means
# no guide term at all: USES_GUIDE is False and the code is not read).
ACTIVATION_CODES = {name: code for code, name in enumerate(a for a in ACTIVATIONS if a != "none")}
_require(
    set(ACTIVATION_CODES) == {"leaky_relu", "relu", "tanh", "sigmoid", "huber"},
    "guide_activation has branches for leaky_relu, relu, tanh, sigmoid, huber",
)
_POLICY_PPO = tl.constexpr(POLICY_CODES["ppo"])
_POLICY_LUFFY = tl.constexpr(POLICY_CODES["luffy"])
_POLICY_RLPLUS = tl.constexpr(POLICY_CODES["rlplus"])
_ACT_LEAKY_RELU = tl.constexpr(ACTIVATION_CODES["leaky_relu"])
_ACT_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_ACT_TANH = tl.constexpr(ACTIVATION_CODES["tanh"])
_ACT_SIGMOID = tl.constexpr(ACTIVATION_CODES["sigmoid"])
_ACT_HUBER = tl.constexpr(ACTIVATION_CODES["huber"])


def policy_code(mode: str) -> int:
    """The constexpr POLICY of a CalibRLConfig.mode."""
    return POLICY_CODES.get(mode, POLICY_CODES["ppo"])


def activation_code(config) -> int:
    """The constexpr ACTIVATION of a CalibRLConfig (any valid code when the loss has no guide term)."""
    return ACTIVATION_CODES[config.activation] if config.uses_guide else 0


def kernel_loss_arguments(config) -> dict:
    """The launch keywords of config that every loss kernel takes: ``loss_scalars``, the fp32 tuple of the
    config's ``kernel_scalars`` (unpacked by ``calibrl_token_terms``), and the constexprs POLICY, USES_GUIDE,
    ACTIVATION."""
    return dict(
        loss_scalars=tuple(float(value) for value in kernel_scalars(config).values()),
        POLICY=policy_code(config.mode),
        USES_GUIDE=config.uses_guide,
        ACTIVATION=activation_code(config),
    )


# ==============================================================================================
# 2. The loss in closed form (elementwise; fp32)
# ==============================================================================================
@triton.jit
def nan_maximum(a, b):
    """max(a, b), NaN when either is NaN, as torch.maximum / torch.clamp. (tl.maximum's default drops a
    NaN operand on the GPU, which would hide a NaN log-prob behind a clamp bound.)"""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_minimum(a, b):
    """min(a, b), NaN when either is NaN, as torch.minimum / torch.clamp."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def ppo_dual_clip_term(lp, old_lp, adv, clip_low, clip_high, dual_clip_c):
    """PPO dual-clip term, its derivative d l / d lp and the two clip flags (torch's tie rules).

    rho = exp(clamp(lp - old_lp, +-20)); l1 = -A rho; l2 = -A clamp(rho, 1 - eps_low, 1 + eps_high);
    lc = max(l1, l2); l = min(lc, -c A) where A < 0 else lc. A NaN lp / old_lp / A gives a NaN term
    (clamp, max and min propagate NaN, as torch's do).
    """
    log_ratio = lp - old_lp
    in_range = (log_ratio >= -_LOG_RATIO_CLAMP) & (log_ratio <= _LOG_RATIO_CLAMP)
    ratio = tl.exp(nan_minimum(nan_maximum(log_ratio, -_LOG_RATIO_CLAMP), _LOG_RATIO_CLAMP))
    d_ratio = tl.where(in_range, ratio, 0.0)
    low = 1.0 - clip_low
    high = 1.0 + clip_high
    ratio_clipped = nan_minimum(nan_maximum(ratio, low), high)
    neg_adv = -adv
    l1 = neg_adv * ratio
    l2 = neg_adv * ratio_clipped
    d_l1 = neg_adv * d_ratio
    d_l2 = tl.where((ratio >= low) & (ratio <= high), d_l1, 0.0)
    lc = nan_maximum(l1, l2)
    # max(x, y): the gradient goes to the larger argument, half to each on a tie.
    d_lc = tl.where(l1 > l2, d_l1, tl.where(l2 > l1, d_l2, 0.5 * (d_l1 + d_l2)))
    l3 = -dual_clip_c * adv
    negative = adv < 0
    term = tl.where(negative, nan_minimum(lc, l3), lc)
    d_capped = tl.where(lc < l3, d_lc, tl.where(lc > l3, 0.0, 0.5 * d_lc))
    d_term = tl.where(negative, d_capped, d_lc)
    clipped = l2 > l1
    clipped_lower = (lc > l3) & negative
    return term, d_term, clipped, clipped_lower


@triton.jit
def focal_factor(x, POWER: tl.constexpr):
    """x ** POWER for x in [0, 1] and POWER > 0 (RL-PLUS's focal factor, x = 1 - p): the correctly rounded
    square root for 0.5 (as torch computes x ** 0.5; tl.sqrt is sqrt.approx on the GPU), else
    exp2(POWER log2 x), which is 0 at x = 0 like the power."""
    tl.static_assert(POWER > 0, "focal_factor: POWER must be > 0")
    if POWER == 0.5:
        return tl.sqrt_rn(x)
    else:
        return tl.where(x > 0, tl.exp2(POWER * tl.log2(x)), 0.0)


@triton.jit
def expert_token_term(lp, old_lp, adv, POLICY: tl.constexpr):
    """The hybrid baselines' term on expert tokens and d term / d lp.

    luffy:  -A p / (p + gamma);                                   p = exp(lp), gamma = LUFFY_SHAPING_GAMMA
    rlplus: -A 2p / (1.5 p_old + 0.5) (1 - sg(p))^RLPLUS_FOCAL_POWER; its derivative equals the term
            itself (d p / d lp = p, and the focal factor is a stop-gradient).
    """
    p = tl.exp(lp)
    if POLICY == _POLICY_LUFFY:
        term = tl.div_rn(-adv * p, p + _LUFFY_GAMMA)
        d_term = tl.div_rn(-adv * _LUFFY_GAMMA * p, (p + _LUFFY_GAMMA) * (p + _LUFFY_GAMMA))
    else:
        tl.static_assert(POLICY == _POLICY_RLPLUS, "expert_token_term: POLICY must be LUFFY or RLPLUS")
        p_old = tl.exp(old_lp)
        focal = focal_factor(tl.maximum(1.0 - p, 0.0), _RLPLUS_FOCAL_POWER)
        term = tl.div_rn(-adv * 2.0 * p, _RLPLUS_OLD_WEIGHT * p_old + _RLPLUS_MIX) * focal
        d_term = term
    return term, d_term


@triton.jit
def guide_activation(z, negative_slope, huber_delta, ACTIVATION: tl.constexpr):
    """act(z) of the calibration term and act'(z), with torch's conventions at the kinks (NaN z: NaN act)."""
    if ACTIVATION == _ACT_LEAKY_RELU:  # slope alpha for z <= 0
        value = tl.where(z > 0, z, z * negative_slope)
        slope = tl.where(z > 0, 1.0, negative_slope)
    elif ACTIVATION == _ACT_RELU:
        value = tl.where(z <= 0, 0.0, z)  # NaN stays NaN, as torch.relu
        slope = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == _ACT_TANH:  # tanh(z) = sign(z) (1 - e^(-2|z|)) / (1 + e^(-2|z|)), overflow-free
        decay = tl.exp(-2.0 * tl.abs(z))
        magnitude = tl.div_rn(1.0 - decay, 1.0 + decay)
        value = tl.where(z < 0, -magnitude, magnitude)
        # 1 - tanh^2 = 4 e^(-2|z|) / (1 + e^(-2|z|))^2: no cancellation when |tanh| -> 1
        slope = tl.div_rn(4.0 * decay, (1.0 + decay) * (1.0 + decay))
    elif ACTIVATION == _ACT_SIGMOID:  # sigmoid(z), from e^(-|z|) so that neither side overflows
        decay = tl.exp(-tl.abs(z))
        value = tl.div_rn(tl.where(z >= 0, 1.0, decay), 1.0 + decay)
        # sigmoid (1 - sigmoid) = e^(-|z|) / (1 + e^(-|z|))^2: no cancellation when sigmoid -> 1
        slope = tl.div_rn(decay, (1.0 + decay) * (1.0 + decay))
    else:  # huber with transition huber_delta
        tl.static_assert(ACTIVATION == _ACT_HUBER, "guide_activation: unknown ACTIVATION code")
        magnitude = tl.abs(z)
        value = tl.where(magnitude < huber_delta, 0.5 * z * z, huber_delta * (magnitude - 0.5 * huber_delta))
        slope = tl.where(z < -huber_delta, -huber_delta, tl.where(z > huber_delta, huber_delta, z))
    return value, slope


@triton.jit
def calibrl_token_terms(
    lp,
    entropy,
    token_inputs,
    loss_scalars,
    POLICY: tl.constexpr,
    USES_GUIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """Everything the loss needs from one token, in closed form.

    Inputs (elementwise, fp32): lp, entropy of the current policy; token_inputs, the tuple (old_lp, adv (A),
    baseline (b, the expert's log-prob baseline), sign (+1 passed, -1 failed), guide_weight (w = |A| or 1),
    is_expert_token (bool), w_loss, w_guide), the last two the aggregation weights (reference.aggregation_weights)
    of the policy/entropy terms and of the guide term (0 where the token does not count).
    Returns (w_loss * l_pg, w_guide * w act(z), clipped, clipped_lower, a, b): the weighted loss
    terms (0 where the weight is 0, whatever the term), the PPO clip flags, and the gradient
    coefficients a = -dL/dlp, b = -dL/dH of L = sum w_loss l_pg + beta sum w_guide w act(z)
    - entropy_coef sum w_loss H. loss_scalars: the config's runtime scalars (``kernel_scalars``).
    """
    old_lp, adv, baseline, sign, guide_weight, is_expert_token, w_loss, w_guide = token_inputs
    clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef = loss_scalars
    pg, d_pg, clipped, clipped_lower = ppo_dual_clip_term(lp, old_lp, adv, clip_low, clip_high, dual_clip_c)
    if POLICY != _POLICY_PPO:  # luffy / rlplus: expert tokens use their own term
        expert_term, d_expert = expert_token_term(lp, old_lp, adv, POLICY)
        pg = tl.where(is_expert_token, expert_term, pg)
        d_pg = tl.where(is_expert_token, d_expert, d_pg)
    counted = w_loss != 0
    pg_weighted = tl.where(counted, w_loss * pg, 0.0)
    d_loss = tl.where(counted, w_loss * d_pg, 0.0)
    if USES_GUIDE:
        z = -sign * (lp - baseline)
        act, d_act = guide_activation(z, negative_slope, huber_delta, ACTIVATION)
        guided = w_guide != 0
        guide_weighted = tl.where(guided, w_guide * (guide_weight * act), 0.0)
        # d (w act(z)) / d lp = w act'(z) dz/dlp, dz/dlp = -s
        d_loss += tl.where(guided, guide_coef * w_guide * (guide_weight * d_act * -sign), 0.0)
    else:
        guide_weighted = tl.zeros(lp.shape, tl.float32)
    coef_lp = -d_loss
    coef_ent = tl.where(counted, entropy_coef * w_loss, 0.0)
    return pg_weighted, guide_weighted, clipped, clipped_lower, coef_lp, coef_ent


# ==============================================================================================
# 3. Per-token inputs and outputs of the loss kernels (shared by the logits and lm_head kernels)
# ==============================================================================================
# The tables of every loss backend, defined in ``reference.coefficients``: the launcher builds the token table
# (N, TOKEN_INPUTS) with ``reference.coefficients.token_table`` (masks, aggregation weights, signs, baselines,
# guide weights), the kernels fill the row table (N, TOKEN_OUTPUTS) whose columns are
# ``reference.coefficients.ROW_FIELDS``, and ``reference.coefficients.loss_output`` turns its column sums into the
# LossOutput. Both tables are token-major fp32 (the C++ kernels' layout too): a block of rows reads one
# field at a stride of a table row, which costs nothing next to the vocabulary work (the tables are O(N)).
# Offsets are int64 (row index * row length), so no token count overflows them.
TOKEN_INPUTS = len(TOKEN_FIELDS)
TOKEN_OUTPUTS = len(ROW_FIELDS)
FIRST_SUMMED_OUTPUT = ROW["pg"]  # row-table columns from here on are summed over tokens (TERM_FIELDS)
_require(ROW_FIELDS[FIRST_SUMMED_OUTPUT:] == TERM_FIELDS, "the summed row-table columns are the last ones")

# constexpr mirrors of the table layout, for use inside kernels
_TOKEN_INPUTS = tl.constexpr(TOKEN_INPUTS)
_TOKEN_OUTPUTS = tl.constexpr(TOKEN_OUTPUTS)
_IN_OLD_LOGP = tl.constexpr(TOKEN["old_logp"])
_IN_ADVANTAGE = tl.constexpr(TOKEN["advantage"])
_IN_BASELINE = tl.constexpr(TOKEN["baseline"])
_IN_SIGN = tl.constexpr(TOKEN["sign"])
_IN_GUIDE_WEIGHT = tl.constexpr(TOKEN["guide_weight"])
_IN_EXPERT = tl.constexpr(TOKEN["expert"])
_IN_C_LOSS = tl.constexpr(TOKEN["c_loss"])
_IN_C_GUIDE = tl.constexpr(TOKEN["c_guide"])
_IN_C_ENTROPY_METRIC = tl.constexpr(TOKEN["c_entropy_metric"])
_IN_C_ALL = tl.constexpr(TOKEN["c_all"])
_OUT_LOGP = tl.constexpr(ROW["logp"])
_OUT_ENTROPY = tl.constexpr(ROW["entropy"])
_OUT_LSE = tl.constexpr(ROW["lse"])
_OUT_COEF_A = tl.constexpr(ROW["coef_a"])
_OUT_COEF_B = tl.constexpr(ROW["coef_b"])
_OUT_PG = tl.constexpr(ROW["pg"])
_OUT_GUIDE = tl.constexpr(ROW["guide"])
_OUT_ENTROPY_LOSS = tl.constexpr(ROW["entropy_loss"])
_OUT_ENTROPY_METRIC = tl.constexpr(ROW["entropy_metric"])
_OUT_CLIPFRAC = tl.constexpr(ROW["clipfrac"])
_OUT_CLIPFRAC_LOWER = tl.constexpr(ROW["clipfrac_lower"])
_OUT_PPO_KL = tl.constexpr(ROW["ppo_kl"])
# the weights that make a token worth reading (any loss or metric weight)
_COUNTING_FIELDS = ("c_loss", "c_guide", "c_entropy_metric", "c_all")


def counted_tokens(table, targets, ignore_index: int):
    """(N,) bool, host-side twin of ``token_is_counted``: tokens with any loss / metric weight."""
    weights = table[:, [TOKEN[name] for name in _COUNTING_FIELDS]]  # (N, 4)
    return (weights != 0).any(dim=1) & (targets != ignore_index)


@triton.jit
def token_input(table_ptr, rows, row_mask, FIELD: tl.constexpr, other):
    """Field FIELD of the token table (N, TOKEN_INPUTS) for tokens ``rows`` [R] (``other`` where masked)."""
    return tl.load(table_ptr + rows * _TOKEN_INPUTS + FIELD, mask=row_mask, other=other)


@triton.jit
def store_token_output(out_ptr, rows, row_mask, FIELD: tl.constexpr, value):
    """Column FIELD of the row table (N, TOKEN_OUTPUTS) := value [R] for tokens ``rows``."""
    tl.store(out_ptr + rows * _TOKEN_OUTPUTS + FIELD, value, mask=row_mask)


@triton.jit
def token_is_counted(table_ptr, rows, row_mask):
    """Whether any loss or metric weight of the tokens ``rows`` is non-zero (else skip their logits)."""
    counted = token_input(table_ptr, rows, row_mask, _IN_C_LOSS, 0.0) != 0
    counted = counted | (token_input(table_ptr, rows, row_mask, _IN_C_GUIDE, 0.0) != 0)
    counted = counted | (token_input(table_ptr, rows, row_mask, _IN_C_ENTROPY_METRIC, 0.0) != 0)
    counted = counted | (token_input(table_ptr, rows, row_mask, _IN_C_ALL, 0.0) != 0)
    return counted & row_mask


@triton.jit
def loss_epilogue(
    table_ptr,
    out_ptr,
    rows,
    row_mask,
    counted,
    lp,
    entropy,
    lse,
    loss_scalars,
    POLICY: tl.constexpr,
    USES_GUIDE: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    """From the row statistics of tokens ``rows`` to every output of the loss kernels.

    table_ptr: (N, TOKEN_INPUTS) fp32 token table; out_ptr: (N, TOKEN_OUTPUTS) fp32 row table out;
    rows [R] int64 token indices, row_mask [R] which of them exist, counted [R] which have a weight;
    lp, entropy, lse [R] fp32 (ignored where not counted: such tokens get zeros everywhere); loss_scalars and the
    three constexprs as the loss kernels take them (``kernel_loss_arguments``).
    """
    lp = tl.where(counted, lp, 0.0)
    entropy = tl.where(counted, entropy, 0.0)
    lse = tl.where(counted, lse, 0.0)
    old_lp = token_input(table_ptr, rows, row_mask, _IN_OLD_LOGP, 0.0)
    adv = token_input(table_ptr, rows, row_mask, _IN_ADVANTAGE, 0.0)
    baseline = token_input(table_ptr, rows, row_mask, _IN_BASELINE, 0.0)
    sign = token_input(table_ptr, rows, row_mask, _IN_SIGN, 0.0)
    guide_weight = token_input(table_ptr, rows, row_mask, _IN_GUIDE_WEIGHT, 0.0)
    is_expert = token_input(table_ptr, rows, row_mask, _IN_EXPERT, 0.0) != 0
    w_loss = token_input(table_ptr, rows, row_mask, _IN_C_LOSS, 0.0)
    w_guide = token_input(table_ptr, rows, row_mask, _IN_C_GUIDE, 0.0)
    w_all = token_input(table_ptr, rows, row_mask, _IN_C_ALL, 0.0)
    w_entropy_metric = token_input(table_ptr, rows, row_mask, _IN_C_ENTROPY_METRIC, 0.0)
    token_inputs = (old_lp, adv, baseline, sign, guide_weight, is_expert, w_loss, w_guide)
    pg, guide, clipped, clipped_lower, coef_lp, coef_ent = calibrl_token_terms(
        lp, entropy, token_inputs, loss_scalars, POLICY, USES_GUIDE, ACTIVATION
    )
    in_metric = w_all != 0
    store_token_output(out_ptr, rows, row_mask, _OUT_LOGP, lp)
    store_token_output(out_ptr, rows, row_mask, _OUT_ENTROPY, entropy)
    store_token_output(out_ptr, rows, row_mask, _OUT_LSE, lse)
    store_token_output(out_ptr, rows, row_mask, _OUT_COEF_A, tl.where(counted, coef_lp, 0.0))
    store_token_output(out_ptr, rows, row_mask, _OUT_COEF_B, tl.where(counted, coef_ent, 0.0))
    store_token_output(out_ptr, rows, row_mask, _OUT_PG, pg)
    store_token_output(out_ptr, rows, row_mask, _OUT_GUIDE, guide)
    store_token_output(out_ptr, rows, row_mask, _OUT_ENTROPY_LOSS, tl.where(w_loss != 0, w_loss * entropy, 0.0))
    store_token_output(
        out_ptr, rows, row_mask, _OUT_ENTROPY_METRIC, tl.where(w_entropy_metric != 0, w_entropy_metric * entropy, 0.0)
    )
    store_token_output(out_ptr, rows, row_mask, _OUT_CLIPFRAC, tl.where(in_metric & clipped, w_all, 0.0))
    store_token_output(out_ptr, rows, row_mask, _OUT_CLIPFRAC_LOWER, tl.where(in_metric & clipped_lower, w_all, 0.0))
    store_token_output(out_ptr, rows, row_mask, _OUT_PPO_KL, tl.where(in_metric, w_all * (old_lp - lp), 0.0))
