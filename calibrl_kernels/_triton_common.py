"""Triton building blocks shared by every kernel of the library (logits path and lm_head path).

Three families of ``@triton.jit`` helpers, written once:

1. Row statistics over the vocabulary, streamed tile by tile (``online_softmax_update`` /
   ``finalize_softmax_statistics``), the per-row inputs of a gradient pass (``gradient_row_inputs``) and
   the gradient of one tile (``logits_grad_tile``). For a row of scaled logits z (temperature applied)
   they keep, in fp32, the running maximum m, s = sum_j e^(z_j - m) and t = sum_j (z_j - m) e^(z_j - m);
   then lse = m + log s and the entropy H = log s - t / s. The shifted sum t avoids the cancellation of
   lse - sum_j p_j z_j when |z| is large. -inf logits (a masked vocabulary, and the padding lanes of the
   last tile) are the identity of every update; a NaN or +inf logit makes the row's statistics, log-prob,
   loss terms and gradient NaN, as in torch.
2. The closed form of the CalibRL loss (and the baselines') per token: the policy term, the guide
   term, the metric flags and the two gradient coefficients a = -dL/dlp and b = -dL/dH (see DESIGN.md
   "The single pass"). Ties (max/min of equal values, clamp at its bounds) follow torch's autograd rules
   so that the kernels take the same branch as ``reference.gradient_coefficients`` at every tie and kink
   (the values then agree to rounding; see "Numerics" below).
3. Reading the per-token inputs of the loss and writing its per-token outputs, in the token / row
   table layout of ``_coefficients`` that every backend shares (``loss_epilogue``).

Tiles are 2-D ``[R, BV]`` (rows x vocabulary); the logits kernels use R = 1, the lm_head kernels R =
BLOCK_N rows. Per-row values are ``[R]``; the loss helpers are elementwise and take any shape.

Numerics on the GPU. Divisions and square roots use the correctly rounded forms (``tl.div_rn``,
``tl.sqrt_rn``, via ``div_rn`` / ``sqrt_rn`` where fp64 is possible), as torch's do: a plain fp32 ``/``
compiles to div.full.f32 (up to 2 ulp off) and ``tl.sqrt`` to sqrt.approx; tests/_triton_compile_check.py
fails on either in any kernel. ``tl.log`` compiles to libdevice's logf, as torch's. ``tl.exp`` stays the
fast ex2.approx.f32 of x log2(e) (relative error ~2^-22 plus ~|x| 2^-24 from the scaling): the vocabulary
loops take one exp per logit at memory speed, which an accurate expf (~20 instructions) would turn into
an arithmetic limit. So on a GPU log-probs, entropies, loss terms and gradients agree with torch to about
1e-6 relative, not bit for bit, and the tests hold them to 1e-5 relative (fp32) against fp64. Under the
interpreter every operation is NumPy's.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _heuristics, _interpreter_compat
from ._coefficients import ROW, ROW_FIELDS, TERM_FIELDS, TOKEN, TOKEN_FIELDS
from .config import (
    ACTIVATIONS,
    LOG_RATIO_CLAMP,
    LUFFY_SHAPING_GAMMA,
    MODES,
    ON_POLICY_ONLY_MODES,
    RLPLUS_FOCAL_POWER,
    RLPLUS_MIX,
    RLPLUS_OLD_WEIGHT,
)


@triton.jit
def _probe():
    """An empty kernel whose type tells how triton built this module's kernels."""
    pass


# Whether the kernels of this process were built for the interpreter. Triton decides when a function is
# decorated (at import of the kernel modules), from TRITON_INTERPRET at that moment: ask triton what it
# built rather than reading the variable again, which may have changed since. Every other module (the
# launch heuristics included: ``_heuristics.interpreting``) uses this value.
BUILT_FOR_INTERPRETER = not isinstance(_probe, triton.runtime.JITFunction)
# Triton 3.6's interpreter cannot take a scalar loop bound under NumPy >= 2.4; fixed here when (and only
# when) the running triton has that defect (``_interpreter_compat``).
INTERPRETER_INDEX_FIXED = BUILT_FOR_INTERPRETER and _interpreter_compat.install()

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


# ==============================================================================================
# 1. Row statistics and the logits gradient of one tile
# ==============================================================================================
@triton.jit
def merge_softmax_statistics(m1, s1, t1, m2, s2, t2):
    """Statistics (m, s, t) [R] of the union of two disjoint parts of rows, each summarised by its own.

    Each t_i is relative to its own m_i: moving it to m gives e^(m_i - m) (t_i + (m_i - m) s_i).
    An empty part (m_i = -inf, s_i = t_i = 0) contributes nothing, without NaN.
    """
    m = tl.maximum(m1, m2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    shift1 = tl.where(m1 == float("-inf"), 0.0, m1 - m_ref)
    shift2 = tl.where(m2 == float("-inf"), 0.0, m2 - m_ref)
    scale1 = tl.exp(shift1)
    scale2 = tl.exp(shift2)
    s = s1 * scale1 + s2 * scale2
    t = (t1 + shift1 * s1) * scale1 + (t2 + shift2 * s2) * scale2
    return m, s, t


@triton.jit
def online_softmax_update(m, s, t, z):
    """Fold a tile of scaled logits z [R, BV] (fp32, -inf allowed) into the row statistics [R].

    m: running max; s = sum e^(z - m); t = sum (z - m) e^(z - m). Returns the updated (m, s, t).
    One exp per element; rows whose entries so far are all -inf keep m = -inf, s = t = 0.
    """
    tile_max = tl.max(z, axis=1)
    tile_ref = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    d = z - tile_ref[:, None]
    e = tl.exp(d)
    tile_s = tl.sum(e, axis=1)
    tile_t = tl.sum(tl.where(z == float("-inf"), 0.0, d * e), axis=1)
    return merge_softmax_statistics(m, s, t, tile_max, tile_s, tile_t)


@triton.jit
def finalize_softmax_statistics(m, s, t):
    """(lse, entropy) of rows summarised by (m, s, t) [R]; an all -inf row gives (-inf, NaN) like torch.

    Only s == 0 exactly means an empty row (s >= 1 otherwise: the maximum contributes e^0). A NaN or +inf
    logit makes s NaN (e^NaN, or e^(inf - inf)); it must give NaN here, as torch.logsumexp / log_softmax
    do, and not pass for an empty row.
    """
    empty = s == 0
    safe_s = tl.where(empty, 1.0, s)
    log_s = tl.log(safe_s)
    lse = tl.where(empty, float("-inf"), m + log_s)
    entropy = tl.where(empty, float("nan"), log_s - tl.div_rn(t, safe_s))
    return lse, entropy


@triton.jit
def logits_grad_tile(z, is_target, lse, entropy, coef_lp, coef_ent):
    """dL/dz of one tile [R, BV] from the two per-row coefficients [R].

    dL/dz_j = a (p_j - [j = y]) + b p_j (z_j - lse + H), with a = coef_lp = -dL/dlp and
    b = coef_ent = -dL/dH; a -inf logit has p_j = 0 and gets a zero gradient (0 * -inf guarded).
    """
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    entropy_part = tl.where(z == float("-inf"), 0.0, p * (log_p + entropy[:, None]))
    return coef_lp[:, None] * (p - is_target.to(tl.float32)) + coef_ent[:, None] * entropy_part


@triton.jit
def gradient_row_inputs(
    targets_ptr, lse_ptr, entropy_ptr, coef_lp_ptr, coef_ent_ptr, stats_stride, scale_ptr, rows, row_mask,
    ignore_index, HAS_SCALE: tl.constexpr,
):
    """Per-row inputs [R] of the logits-gradient kernels (logits path and lm_head path), for rows ``rows``.

    targets_ptr (N,) int64; lse_ptr, entropy_ptr, coef_lp_ptr, coef_ent_ptr: fp32 per-token statistics of
    the forward and coefficients a = -dL/dlp, b = -dL/dH, token t's at offset t * stats_stride; scale_ptr
    () fp32 factor on a and b (read only with HAS_SCALE). Returns (targets, lse, entropy, a, b, active):
    a = b = 0 on rows that are masked or whose target is ignore_index; ``active`` marks the rows with a
    gradient, the only ones whose logits need reading (the others get zeros). A row whose forward
    statistics are NaN (a NaN or +inf logit) is active whatever its coefficients: its gradient is NaN, as
    torch's log_softmax backward gives, instead of a silent zero.
    """
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    at = rows * stats_stride
    coef_lp = tl.load(coef_lp_ptr + at, mask=valid, other=0.0)
    coef_ent = tl.load(coef_ent_ptr + at, mask=valid, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
        coef_lp = tl.where(valid, coef_lp * scale, 0.0)
        coef_ent = tl.where(valid, coef_ent * scale, 0.0)
    lse = tl.load(lse_ptr + at, mask=valid, other=0.0)
    active = (coef_lp != 0) | (coef_ent != 0) | (lse != lse)
    entropy = tl.load(entropy_ptr + at, mask=active, other=0.0)
    return targets, lse, entropy, coef_lp, coef_ent, active


@triton.jit
def token_row_pointers(base_ptr, rows, rows_per_batch, stride_b, stride_t):
    """Pointers [R] to the first entry of token rows ``rows`` ([R] int64) of a (B, T, ...) tensor.

    Flat row r sits at (r // T, r % T); all offsets are int64.
    """
    return base_ptr + (rows // rows_per_batch) * stride_b + (rows % rows_per_batch) * stride_t


@triton.jit
def logits_row_statistics(row_ptrs, V, inv_temperature, active, BLOCK_V: tl.constexpr):
    """(lse, entropy), each [R] fp32, of the rows of logits at ``row_ptrs`` [R] (unit stride, V entries).

    Rows are streamed once in [R, BLOCK_V] tiles. Inactive rows (``active`` [R] false) are not read
    (masked loads; no loop trip at all when no row is active) and give lse = -inf, entropy = NaN,
    which callers replace.
    """
    m = tl.full(active.shape, float("-inf"), tl.float32)
    s = tl.zeros(active.shape, tl.float32)
    t = tl.zeros(active.shape, tl.float32)
    end = tl.where(tl.max(active.to(tl.int32), axis=0) != 0, V, 0)
    for start in range(0, end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=active[:, None] & (cols[None, :] < V), other=float("-inf"))
        m, s, t = online_softmax_update(m, s, t, x.to(tl.float32) * inv_temperature)
    return finalize_softmax_statistics(m, s, t)


# The interpreter (triton 3.6-3.9) truncates fp32 -> bf16 conversions where the GPU rounds to nearest
# even; under the interpreter the rounding is done by hand so that CPU tests see GPU numerics.
_ROUND_BF16_BY_HAND = tl.constexpr(BUILT_FOR_INTERPRETER)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """fp32 x in the element type ``dtype`` of an output, rounded to nearest even when narrowing."""
    if dtype == tl.float32:
        return x
    elif _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return x.to(dtype)


# The interpreter's tl.dot on bf16 operands is unreliable (triton 3.6-3.9): there, operands are upcast.
_UPCAST_DOT_OPERANDS = tl.constexpr(BUILT_FOR_INTERPRETER)


@triton.jit
def dot_tile(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with an fp32 accumulator. On the GPU bf16 / fp16 operands go to the tensor cores as
    they are (INPUT_PRECISION only matters for fp32 operands: "ieee" or "tf32"); under the interpreter
    both operands are upcast to fp32 first (bf16 products are exact in fp32, so results agree)."""
    if _UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def div_rn(a, b):
    """a / b rounded to nearest (IEEE), as torch divides, for fp32 or fp64 tensors a, b of one dtype. On the
    GPU an fp32 ``/`` compiles to div.full.f32 (up to 2 ulp off); fp64 ``/`` is already div.rn.f64."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sqrt_rn(x):
    """The correctly rounded square root of an fp32 or fp64 tensor, as torch.sqrt (fp32 tl.sqrt compiles to
    sqrt.approx.ftz.f32 on the GPU; fp64 tl.sqrt to sqrt.rn.f64)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


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
    lp, entropy, old_lp, adv, baseline, sign, guide_weight, is_expert_token,
    w_loss, w_guide,
    clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef,
    POLICY: tl.constexpr, USES_GUIDE: tl.constexpr, ACTIVATION: tl.constexpr,
):
    """Everything the loss needs from one token, in closed form.

    Inputs (elementwise, fp32): lp, entropy of the current policy; old_lp; adv (A); baseline (b, the
    expert's log-prob baseline); sign (+1 passed, -1 failed); guide_weight (w = |A| or 1);
    is_expert_token (bool); w_loss and w_guide, the aggregation weights (reference.aggregation_weights)
    of the policy/entropy terms and of the guide term (0 where the token does not count).
    Returns (w_loss * l_pg, w_guide * w act(z), clipped, clipped_lower, a, b): the weighted loss
    terms (0 where the weight is 0, whatever the term), the PPO clip flags, and the gradient
    coefficients a = -dL/dlp, b = -dL/dH of L = sum w_loss l_pg + beta sum w_guide w act(z)
    - entropy_coef sum w_loss H.
    """
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
# The tables of every loss backend, defined in ``_coefficients``: the launcher builds the token table
# (N, TOKEN_INPUTS) with ``_coefficients.token_table`` (masks, aggregation weights, signs, baselines,
# guide weights), the kernels fill the row table (N, TOKEN_OUTPUTS) whose columns are
# ``_coefficients.ROW_FIELDS``, and ``_coefficients.loss_output`` turns its column sums into the
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
    table_ptr, out_ptr, rows, row_mask, counted, lp, entropy, lse,
    clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef,
    POLICY: tl.constexpr, USES_GUIDE: tl.constexpr, ACTIVATION: tl.constexpr,
):
    """From the row statistics of tokens ``rows`` to every output of the loss kernels.

    table_ptr: (N, TOKEN_INPUTS) fp32 token table; out_ptr: (N, TOKEN_OUTPUTS) fp32 row table out;
    rows [R] int64 token indices, row_mask [R] which of them exist, counted [R] which have a weight;
    lp, entropy, lse [R] fp32 (ignored where not counted: such tokens get zeros everywhere).
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
    pg, guide, clipped, clipped_lower, coef_lp, coef_ent = calibrl_token_terms(
        lp, entropy, old_lp, adv, baseline, sign, guide_weight, is_expert, w_loss, w_guide,
        clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef,
        POLICY, USES_GUIDE, ACTIVATION,
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


# ==============================================================================================
# Launching with a fixed configuration or, on request, with triton.autotune
# ==============================================================================================
_AUTOTUNED = {}


def launch_device(kernel, kwargs: dict):
    """The device of a launch: that of its tensor arguments, which must all be on one (None without any)."""
    devices = {value.device for value in kwargs.values() if isinstance(value, torch.Tensor)}
    if len(devices) > 1:
        where = {name: str(value.device) for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        raise ValueError(f"{kernel.__name__}: expected every tensor argument on one device, got {where}")
    return next(iter(devices), None)


def device_guard(device):
    """Make ``device`` current for a launch on it: triton launches on the current CUDA device and its
    current stream, so tensors on cuda:1 while cuda:0 is current would be read at the wrong addresses."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, kwargs: dict, fixed: dict, tune_configs, tune_key, allow_autotune: bool = True) -> None:
    """Launch ``kernel`` on ``grid`` with ``kwargs`` plus either the ``fixed`` meta-parameters
    (dict with the kernel's block constexprs and num_warps / num_stages), or, when CALIBRL_AUTOTUNE=1
    and ``allow_autotune``, the best of ``tune_configs`` (same dicts) chosen by triton.autotune keyed
    on the argument names ``tune_key``. Runs on the device of the tensor arguments, made current for it.
    """
    with device_guard(launch_device(kernel, kwargs)):
        _launch_on_current_device(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune)


def _launch_on_current_device(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune) -> None:
    if allow_autotune and _heuristics.autotune_enabled():
        # One tuner per kernel and candidate list: the list depends on the dtype (and the device's shared
        # memory), so a tuner made for bf16 must not serve fp32 calls. (triton's own cache inside a tuner
        # also keys on the tensor arguments' dtypes besides ``tune_key``.)
        cache_key = (kernel, tuple(tune_key), tuple(tuple(sorted(config.items())) for config in tune_configs))
        if cache_key not in _AUTOTUNED:
            configs = []
            for config in tune_configs:
                meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
                configs.append(triton.Config(meta, num_warps=config["num_warps"], num_stages=config["num_stages"]))
            _AUTOTUNED[cache_key] = triton.autotune(configs=configs, key=list(tune_key))(kernel)
        _AUTOTUNED[cache_key][grid](**kwargs)
        return
    kernel[grid](**kwargs, **fixed)
