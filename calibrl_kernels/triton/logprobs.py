"""Token log-probs and entropies from logits in one streaming pass over the vocabulary (Triton).

Forward: each program takes BLOCK_N token rows (1 for real vocabularies on a GPU) and streams their V
logits in [BLOCK_N, BLOCK_V] tiles, keeping an online max /
sum-exp / shifted sum(z e) in fp32 (``_softmax.online_softmax_update``), so the row is read
exactly once; logp = z_y - lse and H = lse - sum_j p_j z_j come out per row, plus lse for the backward.

Backward: the upstream gradients give two coefficients per row, a = -dL/dlogp and b = -dL/dH, and
``_logits_grad_kernel`` streams the row again writing dL/dlogits = (a (p - onehot(y)) + b p (z - lse + H))
/ temperature tile by tile (one read, one write). The same kernel produces the gradient of the fused
CalibRL loss (``triton/loss.py``), whose coefficients come from the loss in closed form, optionally
writing it over the logits buffer.

Logits may be (N, V) or (B, T, V) with any batch / time strides (offsets in int64); a last dimension
that is not contiguous is copied first. Temperature is a runtime scalar (no recompilation per value).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference import inverse_temperature
from ..reference.coefficients import ROW, ROW_FIELDS
from . import _launch
from ._launch import launch
from ._softmax import cast_for_store, gradient_row_inputs, logits_grad_tile, logits_row_statistics, token_row_pointers


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _token_logprobs_fwd_kernel(
    logits,  # (logits_ptr, stride_b, stride_t): (B, T, V) logits, last dim contiguous, and its batch / time strides
    rows_per_batch,  # T: flat token row r sits at (r // T, r % T)
    n_rows,  # N = B * T
    targets_ptr,  # (N,) int64 target ids
    logp_ptr,  # (N,) fp32 out: log softmax(logits / temperature)[target], 0 where ignored
    entropy_ptr,  # (N,) fp32 out: entropy of softmax(logits / temperature), 0 where ignored
    lse_ptr,  # (N,) fp32 out: logsumexp(logits / temperature), 0 where ignored (for the backward)
    V,  # vocabulary size
    inv_temperature,  # fp32 runtime scalar 1 / temperature: logits are scaled by it (one multiply per element)
    ignore_index,  # target value marking a token without log-prob
    BLOCK_N: tl.constexpr,  # token rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [R] int64
    in_range = rows < n_rows
    row_ptrs = token_row_pointers(logits, rows, rows_per_batch)
    targets = tl.load(targets_ptr + rows, mask=in_range, other=ignore_index)
    valid = in_range & (targets != ignore_index)
    lse, entropy = logits_row_statistics(row_ptrs, V, inv_temperature, valid, BLOCK_V)
    target_logit = tl.load(row_ptrs + tl.where(valid, targets, 0), mask=valid, other=0.0).to(tl.float32)
    logp = target_logit * inv_temperature - lse
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0), mask=in_range)
    tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=in_range)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=in_range)


@triton.jit
def _logits_grad_kernel(
    logits,  # (logits_ptr, stride_b, stride_t): (B, T, V) logits, last dim contiguous, and its batch / time strides
    rows_per_batch,  # T: flat token row r sits at (r // T, r % T)
    n_rows,  # N = B * T
    grad,  # (grad_ptr, stride_b, stride_t) of the (B, T, V) out dL/dlogits, logits dtype; may be the logits (in place)
    targets_ptr,  # (N,) int64 target ids
    row_stats,  # (lse, entropy, a, b) (N,) fp32 pointers: the forward's logsumexp of the scaled logits and entropy,
    # a = -dL/dlp, b = -dL/dH per token (gradient_row_inputs), token t at t * stats_stride
    stats_stride,  # element stride between tokens of the row_stats vectors
    scale_ptr,  # () fp32 factor on both coefficients (upstream dL_total/dL), read on device; unused without HAS_SCALE
    V,  # vocabulary size
    inv_temperature,  # fp32 runtime scalar 1 / temperature of the forward
    ignore_index,  # target value of rows that get a zero gradient
    HAS_SCALE: tl.constexpr,  # whether to multiply by *scale_ptr
    BLOCK_N: tl.constexpr,  # token rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [R] int64
    in_range = rows < n_rows
    row_ptrs = token_row_pointers(logits, rows, rows_per_batch)
    grad_row_ptrs = token_row_pointers(grad, rows, rows_per_batch)
    targets, lse, entropy, coef_lp, coef_ent, active = gradient_row_inputs(
        targets_ptr, row_stats, stats_stride, scale_ptr, rows, in_range, ignore_index, HAS_SCALE
    )
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols[None, :] < V
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=active[:, None] & in_row, other=float("-inf"))
        z = x.to(tl.float32) * inv_temperature
        d_logits = logits_grad_tile(z, cols[None, :] == targets[:, None], lse, entropy, coef_lp, coef_ent)
        d_logits = tl.where(active[:, None], d_logits * inv_temperature, 0.0)
        tl.store(
            grad_row_ptrs[:, None] + cols[None, :],
            cast_for_store(d_logits, grad_row_ptrs.dtype.element_ty),
            mask=in_range[:, None] & in_row,
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def as_token_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) or (B, T, V) logits as a (B, T, V) view whose last dimension is contiguous."""
    rows = logits.unsqueeze(0) if logits.dim() == 2 else logits
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    return rows


def _flat_targets(targets: torch.Tensor) -> torch.Tensor:
    return targets.reshape(-1).to(torch.int64).contiguous()


def common_stride(*stats: torch.Tensor) -> int:
    """The one element stride of several (N,) per-token fp32 arrays passed to a kernel with one stride."""
    strides = {t.stride(0) if t.numel() > 1 else 1 for t in stats}
    if len(strides) != 1 or any(t.dtype != torch.float32 for t in stats):
        raise RuntimeError(f"per-token statistics need one stride and fp32, got strides {strides}")
    return strides.pop()


def launch_row_kernel(kernel, rows, targets, temperature: float, ignore_index: int, arguments: dict, **options):
    """Launch a per-row logits kernel (one program per BLOCK_N token rows) on the (B, T, V) logits view ``rows``
    (``as_token_rows``) and the (N,) int64 targets, with the kernel's further launch keywords ``arguments``;
    options: ``launch``'s (allow_autotune)."""
    B, T, V = rows.shape
    config = _launch.row_launch(V)
    common = dict(
        logits=(rows, rows.stride(0), rows.stride(1)),
        rows_per_batch=T,
        n_rows=B * T,
        targets_ptr=targets,
        V=V,
        inv_temperature=inverse_temperature(temperature),
        ignore_index=int(ignore_index),
        BLOCK_N=config.block_n,
    )
    grid = (triton.cdiv(B * T, config.block_n),)
    launch(kernel, grid, {**common, **arguments}, config.meta(), _launch.row_autotune_configs(), ["V"], **options)


def gradient_arguments(lse, entropy, coef_lp, coef_ent, scale: Optional[torch.Tensor]) -> dict:
    """The launch keywords of the logits-gradient kernels (logits and lm_head paths) that carry the per-token
    statistics and coefficients (N,) fp32 (views with one common stride) and the optional 0-d ``scale``."""
    has_scale = scale is not None
    return dict(
        row_stats=(lse, entropy, coef_lp, coef_ent),
        stats_stride=common_stride(lse, entropy, coef_lp, coef_ent),
        scale_ptr=scale.detach().to(torch.float32).reshape(()).contiguous() if has_scale else coef_lp,
        HAS_SCALE=has_scale,
    )


def logprob_entropy_forward(
    rows: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows (B, T, V) from ``as_token_rows``, targets (N,) int64 -> logp, entropy, lse, each (N,) fp32."""
    B, T, V = rows.shape
    n = B * T
    logp = torch.empty(n, dtype=torch.float32, device=rows.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    outputs = dict(logp_ptr=logp, entropy_ptr=entropy, lse_ptr=lse)
    launch_row_kernel(_token_logprobs_fwd_kernel, rows, targets, temperature, ignore_index, outputs)
    return logp, entropy, lse


def logits_backward(
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    coef_lp: torch.Tensor,
    coef_ent: torch.Tensor,
    temperature: float,
    ignore_index: int,
    scale: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """dL/dlogits (B, T, V) in the logits dtype from per-row a = coef_lp, b = coef_ent (N,) fp32.

    lse, entropy, coef_lp, coef_ent: (N,) fp32 views with one common stride (columns of a row table work).
    ``scale`` (0-d tensor, optional) multiplies both coefficients on the device (no host sync).
    ``inplace`` writes the gradient over ``rows`` itself and returns it.
    """
    B, T, V = rows.shape
    coefficients = gradient_arguments(lse, entropy, coef_lp, coef_ent, scale)
    grad = rows if inplace else torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    if B * T == 0:
        return grad
    gradient = dict(coefficients, grad=(grad, grad.stride(0), grad.stride(1)))
    launch_row_kernel(
        _logits_grad_kernel,
        rows,
        targets,
        temperature,
        ignore_index,
        gradient,
        allow_autotune=not inplace,  # the tuner would run an in-place launch over its own output
    )
    return grad


# ----------------------------------------------------------------------------------------------
# Kernels of the calibrl::token_logprobs operators (calibrl_kernels.library)
# ----------------------------------------------------------------------------------------------
def statistics_table(logp: torch.Tensor, entropy: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(N, len(ROW_FIELDS)) fp32 row table holding the per-row logp, entropy and lse."""
    table = torch.zeros(logp.numel(), len(ROW_FIELDS), dtype=torch.float32, device=logp.device)
    for name, column in (("logp", logp), ("entropy", entropy), ("lse", lse)):
        table[:, ROW[name]] = column
    return table


def upstream_rows(rows: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> torch.Tensor:
    """A copy of the row table with a = -dL/dlogp and b = -dL/dH (the incoming gradients) per row."""
    rows = rows.clone()
    rows[:, ROW["coef_a"]] = -grad_logp.reshape(-1).to(rows.dtype)
    rows[:, ROW["coef_b"]] = -grad_entropy.reshape(-1).to(rows.dtype)
    return rows


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int) -> torch.Tensor:
    """logits (N, V) or (B, T, V) fp32 / bf16 / fp16, targets like them -> the (N, ROW_FIELDS) fp32 row table."""
    logp, entropy, lse = logprob_entropy_forward(
        as_token_rows(logits), _flat_targets(targets), temperature, ignore_index
    )
    return statistics_table(logp, entropy, lse)


def token_logprobs_backward(logits, targets, rows, grad_logp, grad_entropy, temperature, ignore_index) -> torch.Tensor:
    """dL/dlogits from the forward's row table and the incoming gradients of logp and entropy."""
    rows = upstream_rows(rows, grad_logp, grad_entropy)
    grad = logits_backward(
        as_token_rows(logits.detach()),
        _flat_targets(targets),
        *(rows[:, ROW[name]] for name in ("lse", "entropy", "coef_a", "coef_b")),
        temperature,
        ignore_index,
    )
    return grad.view(logits.shape)
