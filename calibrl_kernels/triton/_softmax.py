"""Row statistics over the vocabulary and the logits gradient of one tile (``@triton.jit`` helpers).

For a row of scaled logits z (temperature applied) ``online_softmax_update`` / ``finalize_softmax_statistics``
keep, in fp32, the running maximum m, s = sum_j e^(z_j - m) and t = sum_j (z_j - m) e^(z_j - m); then
lse = m + log s and the entropy H = log s - t / s. The shifted sum t avoids the cancellation of
lse - sum_j p_j z_j when |z| is large. -inf logits (a masked vocabulary, and the padding lanes of the last
tile) are the identity of every update; a NaN or +inf logit makes the row's statistics NaN, as in torch.
Tiles are 2-D ``[R, BV]`` (rows x vocabulary); per-row values are ``[R]``.

Numerics on the GPU: divisions and square roots use the correctly rounded forms (``div_rn`` / ``sqrt_rn``),
as torch's do; ``tl.exp`` stays the fast ex2.approx (one exp per logit at memory speed), so values agree
with torch to about 1e-6 relative (tests hold 1e-5 fp32 against fp64). Under the interpreter every
operation is NumPy's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import BUILT_FOR_INTERPRETER


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
    targets_ptr,
    row_stats,
    stats_stride,
    scale_ptr,
    rows,
    row_mask,
    ignore_index,
    HAS_SCALE: tl.constexpr,
):
    """Per-row inputs [R] of the logits-gradient kernels (logits path and lm_head path), for rows ``rows``.

    targets_ptr (N,) int64; row_stats = (lse_ptr, entropy_ptr, coef_lp_ptr, coef_ent_ptr): fp32 per-token
    statistics of the forward and coefficients a = -dL/dlp, b = -dL/dH, token t's at offset t * stats_stride; scale_ptr
    () fp32 factor on a and b (read only with HAS_SCALE). Returns (targets, lse, entropy, a, b, active):
    a = b = 0 on rows that are masked or whose target is ignore_index; ``active`` marks the rows with a
    gradient, the only ones whose logits need reading (the others get zeros). A row whose forward
    statistics are NaN (a NaN or +inf logit) is active whatever its coefficients: its gradient is NaN, as
    torch's log_softmax backward gives, instead of a silent zero.
    """
    lse_ptr, entropy_ptr, coef_lp_ptr, coef_ent_ptr = row_stats
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
def token_row_pointers(view, rows, rows_per_batch):
    """Pointers [R] to the first entry of token rows ``rows`` ([R] int64) of a (B, T, ...) tensor ``view``,
    given as (base pointer, element stride between batch entries, element stride between time steps).

    Flat row r sits at (r // T, r % T), T = rows_per_batch; all offsets are int64.
    """
    base_ptr, stride_b, stride_t = view
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
