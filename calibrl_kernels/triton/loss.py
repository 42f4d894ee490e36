"""The CalibRL loss (and GRPO / DAPO / Dr.GRPO / LUFFY / RL-PLUS) fused over logits (B, T, V) (Triton).

Forward, one kernel, BLOCK_N tokens per program (1 on a GPU for real vocabularies): stream each
token's V logits once (online max / sum-exp / shifted sum(z e), fp32) -> lp, H; then, in closed form
(``_loss_terms.calibrl_token_terms``), the token's weighted policy and guide terms, the metric flags,
and the two gradient coefficients a = -dL/dlp and b = -dL/dH. The aggregation weights c (B, T) of every
term depend on the mask only (``reference.aggregation_weights``), so they are known before launch: the
per-token inputs are ``coefficients.token_table`` (the table every backend uses), and the kernel writes
the row table of ``coefficients.ROW_FIELDS`` (N, 12), whose column sums ``coefficients.loss_output``
turns into the LossOutput. Tokens that carry no weight (padding, ignore_index, expert rows of
on-policy-only modes) are not read.

Backward: dL/dlogits = g * (a (p - onehot) + b p (z - lse + H)) / temperature, g the incoming
gradient, produced tile by tile by ``triton.logprobs._logits_grad_kernel`` (no (N, V) fp32
temporary; the result is written in the logits dtype, optionally over the logits themselves).

Why the gradient is recomputed in backward rather than written during the forward: memory traffic.
With logits of N x V elements of s bytes, the forward reads N V s once. Writing the gradient in the
forward as well (and scaling it by g in backward) costs a write of N V s in forward plus a read and
a write of N V s in backward when g != 1 (or a (N, V) buffer kept alive between the two), i.e. 2-4 N V s
after the forward's read; recomputing costs one read and one write, 2 N V s, which is the floor of any
gradient that depends on the logits. It also needs no state between the passes beyond 4 floats per token.
At N = 16384, V = 151936, bf16 (4.98 GB of logits) that is 3 x 4.98 GB = 14.9 GB of traffic per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import CalibRLConfig
from ..reference.coefficients import ROW
from ._loss_terms import TOKEN_OUTPUTS, kernel_loss_arguments, loss_epilogue, token_is_counted
from ._softmax import logits_row_statistics, token_row_pointers
from .logprobs import _flat_targets, as_token_rows, launch_row_kernel, logits_backward


@triton.jit
def _calibrl_loss_fwd_kernel(
    logits,  # (logits_ptr, stride_b, stride_t): (B, T, V) logits, last dim contiguous, and its batch / time strides
    rows_per_batch,  # T: flat token row r sits at (r // T, r % T)
    targets_ptr,  # (N,) int64 sampled token ids, N = B * T
    table_ptr,  # (N, TOKEN_INPUTS) fp32 token table of the loss (coefficients.token_table)
    out_ptr,  # (N, TOKEN_OUTPUTS) fp32 out: the row table (coefficients.ROW_FIELDS: lp, H, lse, a, b, terms)
    n_rows,  # N
    V,  # vocabulary size
    inv_temperature,  # fp32 runtime scalar 1 / temperature: logits are scaled by it (one multiply per element)
    ignore_index,  # target value of tokens left out of the loss
    loss_scalars,  # fp32 tuple of the config's runtime scalars (config's kernel_scalars: clip widths, c, beta, ...)
    POLICY: tl.constexpr,  # policy-term kind (_loss_terms.POLICY_CODES: PPO, or LUFFY / RLPLUS on expert tokens)
    USES_GUIDE: tl.constexpr,  # whether the guide term exists (mode calibrl, activation != none)
    ACTIVATION: tl.constexpr,  # guide activation code (_loss_terms.ACTIVATION_CODES; unused without USES_GUIDE)
    BLOCK_N: tl.constexpr,  # token rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [R] int64 token indices
    in_range = rows < n_rows
    row_ptrs = token_row_pointers(logits, rows, rows_per_batch)
    targets = tl.load(targets_ptr + rows, mask=in_range, other=ignore_index)
    # Tokens without any weight (padding, ignored targets, dropped expert rows) are not read at all.
    counted = token_is_counted(table_ptr, rows, in_range) & (targets != ignore_index)
    lse, entropy = logits_row_statistics(row_ptrs, V, inv_temperature, counted, BLOCK_V)
    target_logit = tl.load(row_ptrs + tl.where(counted, targets, 0), mask=counted, other=0.0).to(tl.float32)
    lp = target_logit * inv_temperature - lse
    loss_epilogue(
        table_ptr, out_ptr, rows, in_range, counted, lp, entropy, lse, loss_scalars, POLICY, USES_GUIDE, ACTIVATION
    )


# ----------------------------------------------------------------------------------------------
# Host side: the token table before launch (``reference.coefficients``), the LossOutput after
# ----------------------------------------------------------------------------------------------
def calibrl_loss_forward(
    rows: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, config: CalibRLConfig, ignore_index: int
) -> torch.Tensor:
    """rows (B, T, V) logits view, targets (N,) int64, table (N, TOKEN_INPUTS) -> row table (N, TOKEN_OUTPUTS) fp32."""
    B, T, V = rows.shape
    n = B * T
    token_out = torch.zeros(n, TOKEN_OUTPUTS, dtype=torch.float32, device=rows.device)
    if n == 0:
        return token_out
    loss = dict(kernel_loss_arguments(config), table_ptr=table, out_ptr=token_out)
    launch_row_kernel(_calibrl_loss_fwd_kernel, rows, targets, config.temperature, ignore_index, loss)
    return token_out


def fused_calibrl_loss(logits, targets, table, config: CalibRLConfig, ignore_index: int) -> torch.Tensor:
    """logits (B, T, V) fp32 / bf16 / fp16, targets (B, T), table from ``coefficients.loss_token_table`` ->
    the (N, ROW_FIELDS) fp32 row table (statistics, closed-form coefficients and loss terms per token)."""
    return calibrl_loss_forward(as_token_rows(logits.detach()), _flat_targets(targets), table, config, ignore_index)


def fused_calibrl_loss_backward(logits, targets, rows, grad_loss, config: CalibRLConfig, ignore_index: int, out):
    """dL/dlogits from the forward's row table, scaled by the incoming gradient; out=logits writes it over
    the logits buffer (``inplace_backward``), out=None into a new tensor."""
    grad = logits_backward(
        as_token_rows(logits.detach()),
        _flat_targets(targets),
        *(rows[:, ROW[name]] for name in ("lse", "entropy", "coef_a", "coef_b")),
        config.temperature,
        ignore_index,
        scale=grad_loss,
        inplace=out is not None,
    )
    return grad.view(logits.shape)
