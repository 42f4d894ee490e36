"""fused_calibrl_loss on the C++ kernels: forward = one pass per row with the closed-form coefficients
(row_loss); backward = one pass writing dlogits with a, b scaled by the incoming gradient. The logits are read
twice and the gradient written once, with no (N, V) temporary.
"""

from __future__ import annotations

import torch

from .._autograd import can_overwrite, first_order_only
from ..config import DEFAULT_CONFIG, CalibRLConfig, LossInputs, LossOutput
from ..reference import coefficients as coef
from ..reference import compute_dtype, inverse_temperature
from ..reference.coefficients import ROW
from ._rows import row_math, row_table, row_view


class _FusedLoss(torch.autograd.Function):
    """Loss and metrics in one pass per row; backward writes dL/dlogits (over the logits when inplace)."""

    @staticmethod
    def forward(ctx, logits, targets, table, config, ignore_index, math, inplace_backward):
        logits_rows, flat_targets = row_view(logits), targets.reshape(-1).long().contiguous()
        rows = row_table(flat_targets.numel(), logits)
        inv_temperature = inverse_temperature(config.temperature, compute_dtype(logits))
        math.loss(logits_rows, flat_targets, table, rows, config, inv_temperature, ignore_index, False)
        out = coef.loss_output(rows[:, ROW["pg"] :].sum(0), config)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, flat_targets, rows)
        ctx.settings = (inv_temperature, ignore_index, math)
        # Aliasing logits (expanded, overlapping views) get a fresh gradient buffer: see can_overwrite.
        ctx.inplace, ctx.backward_done = inplace_backward and can_overwrite(logits_rows), False
        metrics = tuple(out[1:])
        ctx.mark_non_differentiable(*metrics)
        return (out.loss.clone(),) + metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *unused_metric_grads):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(
                "fused_calibrl_loss(inplace_backward=True): the logits buffer already holds the gradient of a "
                "first backward pass; a second backward (retain_graph=True) cannot recompute it"
            )
        logits, flat_targets, rows = ctx.saved_tensors
        inv_temperature, ignore_index, math = ctx.settings
        rows = rows.clone()
        rows[:, ROW["coef_a"]] *= grad_loss.to(rows.dtype)
        rows[:, ROW["coef_b"]] *= grad_loss.to(rows.dtype)
        logits_rows = row_view(logits.detach())
        # In place: row_gradient reads each row before overwriting it (a strided view is written as is;
        # logits without unit stride along V were copied by row_view, and the copy is overwritten).
        grad = logits_rows if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype)
        math.module.row_gradient(logits_rows, flat_targets, rows, inv_temperature, ignore_index, grad)
        if ctx.inplace:
            ctx.backward_done = True
            # The kernel's writes are invisible to autograd: bump the version counter so that any other
            # node that saved these logits fails loudly instead of reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return (grad.view(logits.shape),) + (None,) * 6


def fused_calibrl_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inputs: LossInputs,
    config: CalibRLConfig = DEFAULT_CONFIG,
    inplace_backward: bool = False,
) -> LossOutput:
    """The C++ backend of ``ops.fused_calibrl_loss``: logits (B, T, V) on the CPU, targets (B, T).

    inplace_backward=True writes dL/dlogits over the logits buffer during backward (no logits-sized
    gradient buffer): afterwards ``logits`` holds its own gradient (``logits.grad`` aliases it when
    logits is a leaf) and must not be used as logits again; a second backward raises.
    """
    math = row_math()
    table = coef.loss_token_table(targets, inputs, config, compute_dtype(logits))
    return LossOutput(*_FusedLoss.apply(logits, targets, table, config, inputs.ignore_index, math, inplace_backward))
