"""Fused lm_head + log-prob / entropy / CalibRL loss from hidden states (Triton): no (N, V) logits.

logits = hidden (N, D) @ weight (V, D)^T + bias (V,), divided by the temperature. All kernels tile
tokens x vocabulary and reduce over D with ``tl.dot`` (fp32 accumulation; bf16 / fp16 / fp32 inputs).

Forward (2 N D V FLOPs): ``_linear_stats_kernel`` computes each [BLOCK_M tokens x BLOCK_N vocabulary]
logit tile in registers and folds it into online row statistics (max, sum-exp, shifted sum(z e) and the
target's logit; ``_softmax.online_softmax_update``). The vocabulary is split over several programs
per row block when rows alone would not fill the GPU; ``_linear_finish_kernel`` merges the partial
statistics (``merge_softmax_statistics``) into lse, H, lp and runs the same closed-form loss epilogue
as the logits path (``loss_epilogue``), or writes log-probs / entropies for ``linear_token_logprobs``.
Only O(N) floats leave the kernels.

Backward: the gradient pass recomputes the logits, chunk by chunk of vocabulary columns:
``_linear_dlogits_kernel`` rebuilds a logit tile (tl.dot over D), turns it into dL/dlogits with the two
per-row coefficients (``logits_grad_tile``) and stores it into an (N, C) chunk buffer in the input dtype;
then two GEMMs (``_matmul_kernel``): dWeight[chunk] = dlogits_chunk^T @ hidden and
dHidden += dlogits_chunk @ weight[chunk] (fp32 accumulator), and dBias[chunk] = column sums.

Why recompute instead of keeping logit tiles: a tile cannot be turned into its gradient before the
whole row's lse / H / loss coefficients are known, i.e. after the full vocabulary has been seen, so
the logits would have to survive the forward. On chip that is impossible (one row block of 128 tokens
x V = 151936 in bf16 is 39 MB, against 228 KiB of shared memory per SM); in HBM it is the (N, V) tensor
this op exists to avoid (N = 16384: 5 GB). Recomputing costs one more 2 N D V GEMM: 8 N D V FLOPs in all
instead of the 6 N D V roofline (forward 2, backward recompute 2 + dHidden 2 + dWeight 2), i.e. a
1.33x floor, paid in tensor-core time rather than memory. The alternative that reaches 6 N D V (compute
the gradient during the forward from a materialised chunk of full rows, as Liger-Kernel does) must chunk
over rows, and then every row chunk re-reads and re-writes all of dWeight (V x D fp32: 2.5 GB at
V = 151936, D = 4096) - 32 chunks of 512 rows move 160 GB, more time than the GEMM it saves.

Chunking the backward over vocabulary columns instead makes dWeight cheap and exact: each dWeight tile
is produced once by one program whose fp32 accumulator runs over all N rows in a fixed order, so it is
deterministic by construction (no fp32 atomics, nothing to opt out of) and needs no (V, D) buffer.
dHidden is accumulated across the V / C chunks in an fp32 (N, D) buffer (a read and write of N D 4 bytes
per chunk: 37 chunks x 0.5 GB = 20 GB at N = 16384, D = 4096, C = 4096, ~7 ms of a ~100 ms step).
Extra memory: the chunk (<= ``_launch.LINEAR_CHUNK_BYTES``, 128 MiB; freed before the end) + the fp32
dHidden accumulator when hidden is not fp32 (N D 4 bytes) + O(N) statistics; at N = 16384, D = 4096 bf16
the backward peaks at 384 MiB beyond dWeight (arithmetic in ``linear_gradients``).

The chunk budget of this GPU path is its own constant, ``_launch.LINEAR_CHUNK_BYTES``; the CPU path's
``CALIBRL_CHUNK_BYTES`` (``chunked``, default 1/16 of the machine's memory, 64 MiB to 1 GiB) does not apply
here (it does to fp64 inputs, which ``_dispatch`` sends to ``chunked``). The two budgets bound
different things: on the CPU a row chunk of fp32 logits plus the row math's temporaries; here one (N, C)
column chunk of the logits gradient in the input dtype, whose size also sets how often the fp32 dHidden
accumulator is re-read and re-written (N D 8 bytes per chunk). The CPU default applied here would give
C = 1280 columns at N = 16384 bf16: 119 chunks instead of 38, i.e. 43 GB more accumulator traffic, ~15 ms
per step at 3 TB/s (~10%), so a variable tuned for CPU memory would silently slow the GPU down.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..config import DEFAULT_CONFIG
from ..reference import inverse_temperature
from ..reference.coefficients import ROW
from . import _launch
from ._launch import launch
from ._loss_terms import TOKEN_OUTPUTS, counted_tokens, kernel_loss_arguments, loss_epilogue, token_is_counted
from ._softmax import (
    cast_for_store,
    dot_tile,
    finalize_softmax_statistics,
    gradient_row_inputs,
    logits_grad_tile,
    merge_softmax_statistics,
    online_softmax_update,
)
from .logprobs import gradient_arguments, statistics_table, upstream_rows

# Partial statistics of the split-V forward, one (SPLITS, N) plane each: running max, sum-exp, shifted
# sum(z e) and the target's logit (constexpr: read inside the kernels).
_PART_MAX = tl.constexpr(0)
_PART_SUM = tl.constexpr(1)
_PART_SHIFTED = tl.constexpr(2)
_PART_TARGET = tl.constexpr(3)
PARTIAL_FIELDS = 4
# The lm_head operands of the logits kernels are one tuple argument ``lm_head`` (``_lm_head_arguments``):
# (hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr): hidden (N, D) and weight (V, D), each a pointer and its
# element stride between rows (last dims contiguous), and the bias (V,) (the weight when there is no bias: not read
# without HAS_BIAS).


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def linear_logits_tile(
    lm_head,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    d_end,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Scaled logits [R, C] fp32 of token rows ``rows`` [R] and vocabulary entries ``cols`` [C] (int64):
    (hidden[rows] . weight[cols] + bias[cols]) / temperature, reducing over D in BLOCK_K steps up to
    ``d_end`` (D, or 0 to skip the work for rows that need nothing); -inf at the columns outside ``col_mask``.
    lm_head: the kernels' tuple (hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr) of the lm_head operands."""
    hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr = lm_head
    acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for d0 in range(0, d_end, BLOCK_K):
        dd = d0 + tl.arange(0, BLOCK_K)
        in_d = dd[None, :] < D
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + dd[None, :], mask=row_mask[:, None] & in_d, other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + dd[None, :], mask=col_mask[:, None] & in_d, other=0.0)
        acc = dot_tile(h, tl.trans(w), acc, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _linear_stats_kernel(
    lm_head,  # (hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr): hidden (N, D), weight (V, D), bias (V,)
    targets_ptr,  # (N,) int64 target ids (ignore_index never matches a column)
    active_ptr,  # (N,) int8: 1 where the row's statistics are needed
    partial_ptr,  # (PARTIAL_FIELDS, SPLITS, N) fp32 out: per split max, sum-exp, shifted sum, target logit
    N,  # tokens (rows of hidden)
    V,  # vocabulary size (rows of weight)
    D,  # hidden size (reduction dimension of tl.dot)
    splits,  # SPLITS: programs sharing the vocabulary of one row block
    inv_temperature,  # fp32 runtime scalar 1 / temperature
    HAS_BIAS: tl.constexpr,  # whether the bias of lm_head is read
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,  # token rows per program
    BLOCK_N: tl.constexpr,  # vocabulary tile
    BLOCK_K: tl.constexpr,  # hidden-feature step of tl.dot
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    active = (tl.load(active_ptr + rows, mask=row_mask, other=0) != 0) & row_mask
    d_end = tl.where(tl.max(active.to(tl.int32), axis=0) != 0, D, 0)  # a block without work skips its GEMMs
    per_split = tl.cdiv(tl.cdiv(V, splits), BLOCK_N) * BLOCK_N
    v_begin = split * per_split
    v_end = tl.minimum(V, v_begin + per_split)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < v_end
        z = linear_logits_tile(
            lm_head, rows, row_mask, cols, col_mask, D, d_end, inv_temperature, HAS_BIAS, INPUT_PRECISION, BLOCK_K
        )
        m, s, t = online_softmax_update(m, s, t, z)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    plane = splits * N
    here = split * N + rows
    tl.store(partial_ptr + _PART_MAX * plane + here, m, mask=row_mask)
    tl.store(partial_ptr + _PART_SUM * plane + here, s, mask=row_mask)
    tl.store(partial_ptr + _PART_SHIFTED * plane + here, t, mask=row_mask)
    tl.store(partial_ptr + _PART_TARGET * plane + here, target_logit, mask=row_mask)


@triton.jit
def _linear_finish_kernel(
    partial_ptr,  # (PARTIAL_FIELDS, SPLITS, N) fp32 partial statistics of _linear_stats_kernel
    splits,  # SPLITS: vocabulary parts per row whose statistics are merged here
    targets_ptr,  # (N,) int64 target ids
    N,  # tokens
    ignore_index,  # target value of tokens without log-prob
    table_ptr,  # WITH_LOSS: (N, TOKEN_INPUTS) fp32 token table of the loss (coefficients.token_table)
    out_ptr,  # WITH_LOSS: (N, TOKEN_OUTPUTS) fp32 out: the row table, as the logits path's loss kernel
    logp_ptr,  # not WITH_LOSS: (N,) fp32 out log-prob (0 where ignored)
    entropy_ptr,  # not WITH_LOSS: (N,) fp32 out entropy (0 where ignored)
    lse_ptr,  # not WITH_LOSS: (N,) fp32 out logsumexp (0 where ignored)
    # The loss scalars and constexprs, as in the logits path's _calibrl_loss_fwd_kernel (unused without WITH_LOSS):
    loss_scalars,  # fp32 tuple of the config's runtime scalars (kernel_scalars)
    POLICY: tl.constexpr,  # policy-term kind (_loss_terms.POLICY_CODES)
    USES_GUIDE: tl.constexpr,  # whether the guide term exists
    ACTIVATION: tl.constexpr,  # guide activation code (_loss_terms.ACTIVATION_CODES)
    WITH_LOSS: tl.constexpr,  # loss epilogue, or plain log-prob / entropy outputs
    BLOCK_M: tl.constexpr,  # tokens per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    plane = splits * N
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    for split in range(0, splits):
        here = split * N + rows
        m_i = tl.load(partial_ptr + _PART_MAX * plane + here, mask=row_mask, other=float("-inf"))
        s_i = tl.load(partial_ptr + _PART_SUM * plane + here, mask=row_mask, other=0.0)
        t_i = tl.load(partial_ptr + _PART_SHIFTED * plane + here, mask=row_mask, other=0.0)
        m, s, t = merge_softmax_statistics(m, s, t, m_i, s_i, t_i)
        target_logit += tl.load(partial_ptr + _PART_TARGET * plane + here, mask=row_mask, other=0.0)
    lse, entropy = finalize_softmax_statistics(m, s, t)
    lp = target_logit - lse
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    if WITH_LOSS:
        counted = token_is_counted(table_ptr, rows, row_mask) & valid
        loss_epilogue(
            table_ptr, out_ptr, rows, row_mask, counted, lp, entropy, lse, loss_scalars, POLICY, USES_GUIDE, ACTIVATION
        )
    else:
        tl.store(logp_ptr + rows, tl.where(valid, lp, 0.0), mask=row_mask)
        tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_mask)
        tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_mask)


@triton.jit
def _linear_dlogits_kernel(
    lm_head,  # (hidden_ptr, stride_hn, weight_ptr, stride_wv, bias_ptr): hidden (N, D), weight (V, D), bias (V,)
    targets_ptr,  # (N,) int64 target ids
    row_stats,  # (lse, entropy, a, b) (N,) fp32 pointers: the forward's logsumexp of the scaled logits and entropy,
    # a = -dL/dlp, b = -dL/dH per token (gradient_row_inputs), token t at t * stats_stride
    stats_stride,  # element stride between tokens of the row_stats vectors
    scale_ptr,  # () fp32 incoming gradient multiplying a and b (unused without HAS_SCALE)
    dlogits_ptr,  # (N, C) out: dL/dlogits of vocabulary columns [v_begin, v_end), in the input dtype
    stride_gn,  # element stride between rows of dlogits
    N,  # tokens (rows of hidden)
    V,  # vocabulary size (rows of weight)
    D,  # hidden size (reduction dimension of tl.dot)
    v_begin,  # first vocabulary column of this chunk
    v_end,  # one past its last column
    inv_temperature,  # fp32 runtime scalar 1 / temperature
    ignore_index,  # target value of rows without gradient
    HAS_BIAS: tl.constexpr,  # whether the bias of lm_head is read
    HAS_SCALE: tl.constexpr,  # whether a and b are multiplied by *scale_ptr
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs
    BLOCK_M: tl.constexpr,  # token rows per program
    BLOCK_N: tl.constexpr,  # vocabulary tile
    BLOCK_K: tl.constexpr,  # hidden-feature step of tl.dot
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = v_begin + tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < v_end
    targets, lse, entropy, coef_lp, coef_ent, active = gradient_row_inputs(
        targets_ptr, row_stats, stats_stride, scale_ptr, rows, row_mask, ignore_index, HAS_SCALE
    )
    d_end = tl.where(tl.max(active.to(tl.int32), axis=0) != 0, D, 0)  # blocks without gradient: zeros
    z = linear_logits_tile(
        lm_head, rows, row_mask, cols, col_mask, D, d_end, inv_temperature, HAS_BIAS, INPUT_PRECISION, BLOCK_K
    )
    grad = logits_grad_tile(z, cols[None, :] == targets[:, None], lse, entropy, coef_lp, coef_ent) * inv_temperature
    grad = tl.where(active[:, None] & col_mask[None, :], grad, 0.0)
    tl.store(
        dlogits_ptr + rows[:, None] * stride_gn + (cols - v_begin)[None, :],
        cast_for_store(grad, dlogits_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _matmul_kernel(
    a_ptr,  # (M, K) left operand, any strides
    stride_am,  # element stride of a between rows (m)
    stride_ak,  # element stride of a between columns (k)
    b_ptr,  # (K, N) right operand, any strides (same dtype as a)
    stride_bk,  # element stride of b between rows (k)
    stride_bn,  # element stride of b between columns (n)
    c_ptr,  # (M, N) out, in its own dtype; with ACCUMULATE read as well (the fp32 dHidden accumulator)
    stride_cm,  # element stride of c between rows (m)
    stride_cn,  # element stride of c between columns (n)
    M,  # rows of a and c
    N,  # columns of b and c
    K,  # reduction size: columns of a, rows of b
    ACCUMULATE: tl.constexpr,  # c += a @ b instead of c = a @ b
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 inputs ("ieee" or "tf32")
    BLOCK_M: tl.constexpr,  # rows of the output tile of one program
    BLOCK_N: tl.constexpr,  # columns of the output tile of one program
    BLOCK_K: tl.constexpr,  # reduction step of one tl.dot
    GROUP_M: tl.constexpr,  # row tiles per group of the launch order (L2 reuse of b's column tiles)
):
    """c (+)= a @ b with an fp32 accumulator; every output tile is owned by one program (deterministic)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = dot_tile(a, b, acc, INPUT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, cast_for_store(acc, c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products unless torch itself allows TF32 matmuls (as the reference would)."""
    if dtype == torch.float32 and _launch.tf32_matmuls_allowed():
        return "tf32"
    return "ieee"


def _tiles(dtype: torch.dtype, device: torch.device, gemm: bool = False, accumulate: bool = False):
    """(fixed TileLaunch, its launch keywords, autotune candidates) for operands of ``dtype`` on ``device``
    (whose shared-memory limit bounds the pipeline stages)."""
    limit = _launch.shared_memory_limit(device)
    if gemm:
        fixed = _launch.gemm_tile_launch(dtype, accumulate, limit)
    else:
        fixed = _launch.linear_tile_launch(dtype, limit)
    return fixed, fixed.meta(), _launch.linear_autotune_configs(dtype, limit)


def _lm_head_arguments(hidden, weight, bias, targets, temperature: float) -> dict:
    """The launch keywords of the lm_head operands that the logits kernels (statistics, dlogits) share."""
    return dict(
        lm_head=(hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight),
        targets_ptr=targets,
        N=hidden.shape[0],
        V=weight.shape[0],
        D=hidden.shape[1],
        inv_temperature=inverse_temperature(temperature),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_dot_precision(hidden.dtype),
    )


def linear_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    active: torch.Tensor,
    temperature: float,
):
    """Partial row statistics (PARTIAL_FIELDS, SPLITS, N) fp32 and SPLITS (forward pass over V)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    fixed, meta, tune = _tiles(hidden.dtype, hidden.device)
    row_blocks = triton.cdiv(N, fixed.block_m)
    splits = _launch.linear_vocab_splits(row_blocks, triton.cdiv(V, fixed.block_n), hidden.device)
    partial = torch.empty(PARTIAL_FIELDS, splits, N, dtype=torch.float32, device=hidden.device)
    launch(
        _linear_stats_kernel,
        lambda meta_: (triton.cdiv(N, meta_["BLOCK_M"]), splits),
        dict(
            **_lm_head_arguments(hidden, weight, bias, targets, temperature),
            active_ptr=active,
            partial_ptr=partial,
            splits=splits,
        ),
        meta,
        tune,
        ["N", "V", "D"],
    )
    return partial, splits


def finish_statistics(partial, splits, targets, ignore_index, table=None, config=None):
    """Merge the partial statistics; with ``table`` run the loss epilogue -> row table (N, TOKEN_OUTPUTS),
    otherwise -> (logp, entropy, lse) each (N,) fp32."""
    N = targets.numel()
    device = targets.device
    with_loss = table is not None
    if with_loss:
        token_out = torch.zeros(N, TOKEN_OUTPUTS, dtype=torch.float32, device=device)
        outputs = dict(table_ptr=table, out_ptr=token_out, logp_ptr=token_out, entropy_ptr=token_out, lse_ptr=token_out)
        loss_args = kernel_loss_arguments(config)
    else:
        logp, entropy, lse = torch.empty(3, N, dtype=torch.float32, device=device).unbind(0)
        outputs = dict(table_ptr=logp, out_ptr=logp, logp_ptr=logp, entropy_ptr=entropy, lse_ptr=lse)
        loss_args = kernel_loss_arguments(DEFAULT_CONFIG)
    meta = _launch.finish_launch()
    launch(
        _linear_finish_kernel,
        (triton.cdiv(N, meta["BLOCK_M"]),),
        dict(
            partial_ptr=partial,
            splits=splits,
            targets_ptr=targets,
            N=N,
            ignore_index=int(ignore_index),
            **outputs,
            **loss_args,
            WITH_LOSS=with_loss,
        ),
        meta,
        (),
        (),
        allow_autotune=False,
    )
    return token_out if with_loss else (logp, entropy, lse)


def linear_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    coef_lp: torch.Tensor,
    coef_ent: torch.Tensor,
    scale: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
):
    """(dHidden (N, D), dWeight (V, D), dBias (V,)) in the input dtypes (None where not needed) from the
    per-row coefficients a = coef_lp, b = coef_ent (N,) fp32, times ``scale`` (0-d, on the device).
    lse, entropy, coef_lp, coef_ent: (N,) fp32 views with one common stride.

    Memory beyond the outputs, at N = 16384, D = 4096, V = 151936, bf16 (chunk C = 4096 columns):
    the fp32 dHidden accumulator N D 4 = 256 MiB lives throughout; the (N, C) dlogits chunk, N C 2 =
    128 MiB, only during the chunk loop (``_chunked_gradients``: it is freed before the cast); the cast
    then allocates dHidden itself, N D 2 = 128 MiB, next to the accumulator. Peak beyond dWeight:
    max(256 + 128 (loop), 256 + 128 (cast)) = 384 MiB (512 MiB when the chunk outlived the loop); beyond
    dWeight and dHidden: 384 MiB in the loop, 256 MiB at the cast. The floor of this design is
    accumulator + chunk: dHidden sums over vocabulary chunks, so an exact (fp32) sum needs the N x D fp32
    accumulator whatever the chunk, and a smaller chunk re-reads and re-writes that accumulator more often
    (each chunk costs N D 8 bytes of traffic: halving the chunk adds up to ~6.5 ms, ~5%, at this shape). With
    fp32 hidden the accumulator is dHidden itself (no cast).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    d_hidden = torch.empty(N, D, dtype=torch.float32, device=device) if need_hidden else None  # fp32 accumulator
    d_weight = torch.empty(V, D, dtype=weight.dtype, device=device) if need_weight else None
    d_bias = torch.empty(V, dtype=torch.float32, device=device) if need_bias and bias is not None else None
    chunk_arguments = dict(  # the launch keywords of _linear_dlogits_kernel that every chunk shares
        **_lm_head_arguments(hidden, weight, bias, targets, temperature),
        **gradient_arguments(lse, entropy, coef_lp, coef_ent, scale),
        ignore_index=int(ignore_index),
    )
    _chunked_gradients(hidden, weight, chunk_arguments, d_hidden, d_weight, d_bias)
    return _narrowed(d_hidden, hidden.dtype), d_weight, _narrowed(d_bias, None if bias is None else bias.dtype)


def _narrowed(accumulator: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """An fp32 gradient accumulator in its input's dtype (the accumulator itself when that is fp32)."""
    return None if accumulator is None else accumulator.to(dtype)


def _chunked_gradients(hidden, weight, chunk_arguments: dict, d_hidden, d_weight, d_bias) -> None:
    """The chunk loop of ``linear_gradients``: fills d_hidden (N, D) fp32 (accumulated over chunks),
    d_weight (V, D) and d_bias (V,) fp32, each optional, launching _linear_dlogits_kernel with
    ``chunk_arguments`` and each chunk's columns. The (N, C) dlogits chunk buffer is local: it is
    freed when this returns, before the accumulators are cast."""
    N = hidden.shape[0]
    V = weight.shape[0]
    dtype = hidden.dtype
    fixed, meta, tune = _tiles(dtype, hidden.device)
    precision = _dot_precision(dtype)
    chunk = _launch.linear_chunk_columns(N, V, hidden.element_size(), fixed.block_n)
    dlogits = torch.empty(N, chunk, dtype=dtype, device=hidden.device)
    for v_begin in range(0, V, chunk):
        v_end = min(V, v_begin + chunk)
        width = v_end - v_begin
        launch(
            _linear_dlogits_kernel,
            lambda meta_, width=width: (triton.cdiv(N, meta_["BLOCK_M"]), triton.cdiv(width, meta_["BLOCK_N"])),
            dict(**chunk_arguments, dlogits_ptr=dlogits, stride_gn=dlogits.stride(0), v_begin=v_begin, v_end=v_end),
            meta,
            tune,
            ["N", "D"],
        )
        g = dlogits[:, :width]  # (N, width)
        if d_weight is not None:  # dWeight[chunk] = g^T @ hidden, K = N: one writer per tile
            _matmul(g.t(), hidden, d_weight[v_begin:v_end], accumulate=False, precision=precision)
        if d_hidden is not None:  # dHidden += g @ weight[chunk]
            _matmul(g, weight[v_begin:v_end], d_hidden, accumulate=v_begin > 0, precision=precision)
        if d_bias is not None:
            torch.sum(g, dim=0, dtype=torch.float32, out=d_bias[v_begin:v_end])


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, precision: str) -> None:
    """c (+)= a @ b on strided 2-D views (one program per output tile)."""
    M, K = a.shape
    N = b.shape[1]
    fixed, meta, tune = _tiles(a.dtype, a.device, gemm=True, accumulate=accumulate)
    launch(
        _matmul_kernel,
        lambda meta_: (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),),
        dict(
            a_ptr=a,
            stride_am=a.stride(0),
            stride_ak=a.stride(1),
            b_ptr=b,
            stride_bk=b.stride(0),
            stride_bn=b.stride(1),
            c_ptr=c,
            stride_cm=c.stride(0),
            stride_cn=c.stride(1),
            M=M,
            N=N,
            K=K,
            ACCUMULATE=accumulate,
            INPUT_PRECISION=precision,
            GROUP_M=8,
        ),
        meta,
        tune,
        ["M", "N", "K"],
        allow_autotune=not accumulate,  # the tuner would add into c once per trial
    )


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor):
    """2-D hidden (N, D) and weight (V, D) with contiguous last dims, flat int64 targets."""
    D = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, D)
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    weight2 = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias2 = None if bias is None else bias.contiguous()
    return hidden2, weight2, bias2, targets.reshape(-1).to(torch.int64).contiguous()


# ----------------------------------------------------------------------------------------------
# Kernels of the calibrl::linear_token_logprobs / fused_linear_calibrl_loss operators (library.py)
# ----------------------------------------------------------------------------------------------
def _detached(hidden, weight, bias, targets):
    return _prepare(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets)


def _gradients(hidden, weight, bias, targets, rows, scale, config_temperature, ignore_index, needs):
    """(dHidden (N, D) or None, dWeight or None, dBias or None) from a row table with coefficients a, b."""
    h, w, b, flat_targets = _detached(hidden, weight, bias, targets)
    return linear_gradients(
        h,
        w,
        b,
        flat_targets,
        *(rows[:, ROW[name]] for name in ("lse", "entropy", "coef_a", "coef_b")),
        scale,
        config_temperature,
        ignore_index,
        need_hidden=needs[0],
        need_weight=needs[1],
        need_bias=b is not None and needs[2],
    )


def linear_token_logprobs(hidden, weight, bias, targets, temperature, ignore_index, chunk_bytes=None) -> torch.Tensor:
    """hidden (N, D) / (B, T, D), weight (V, D), bias (V,) -> the (N, ROW_FIELDS) fp32 row table (logp,
    entropy, lse), never materialising (N, V) logits; chunk_bytes is the chunked path's (not read here)."""
    h, w, b, flat_targets = _detached(hidden, weight, bias, targets)
    active = (flat_targets != ignore_index).to(torch.int8)
    partial, splits = linear_statistics(h, w, b, flat_targets, active, temperature)
    return statistics_table(*finish_statistics(partial, splits, flat_targets, ignore_index))


def linear_token_logprobs_backward(
    hidden, weight, bias, targets, rows, grad_logp, grad_entropy, temperature, ignore_index, needs, chunk_bytes=None
):
    """(dHidden (N, D), dWeight, dBias) (None where not needed) from the incoming gradients of logp and entropy."""
    rows = upstream_rows(rows, grad_logp, grad_entropy)
    return _gradients(hidden, weight, bias, targets, rows, None, temperature, ignore_index, needs)


def fused_linear_calibrl_loss(hidden, weight, bias, targets, table, config, ignore_index, needs, chunk_bytes=None):
    """(row table (N, ROW_FIELDS) fp32, None, None, None): the gradients are computed in the backward."""
    h, w, b, flat_targets = _detached(hidden, weight, bias, targets)
    counted = counted_tokens(table, flat_targets, ignore_index).to(torch.int8)
    partial, splits = linear_statistics(h, w, b, flat_targets, counted, config.temperature)
    rows = finish_statistics(partial, splits, flat_targets, ignore_index, table=table, config=config)
    return rows, None, None, None


def fused_linear_calibrl_loss_backward(hidden, weight, bias, targets, rows, grad_loss, config, ignore_index, needs):
    """(dHidden (N, D), dWeight, dBias) (None where not needed), scaled by the incoming gradient on the device."""
    return _gradients(hidden, weight, bias, targets, rows, grad_loss, config.temperature, ignore_index, needs)
