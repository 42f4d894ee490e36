"""token_logprobs on the C++ kernels: forward = one pass per row (row_stats); backward = one pass writing dlogits."""

from __future__ import annotations

import torch

from .._autograd import first_order_only
from ..reference import compute_dtype, inverse_temperature
from ..reference.coefficients import ROW
from ._rows import row_math, row_table, row_view


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, math):
        logits_rows, flat_targets = row_view(logits), targets.reshape(-1).long().contiguous()
        rows = row_table(flat_targets.numel(), logits)
        math.module.row_stats(logits_rows, flat_targets, inv_temperature, ignore_index, rows)
        ctx.save_for_backward(logits, flat_targets, rows)
        ctx.settings = (inv_temperature, ignore_index, math)
        return rows[:, ROW["logp"]].clone().view(targets.shape), rows[:, ROW["entropy"]].clone().view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, grad_entropy):
        logits, flat_targets, rows = ctx.saved_tensors
        inv_temperature, ignore_index, math = ctx.settings
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        rows = rows.clone()
        rows[:, ROW["coef_a"]] = 0.0 if grad_logp is None else -grad_logp.reshape(-1).to(rows.dtype)
        rows[:, ROW["coef_b"]] = 0.0 if grad_entropy is None else -grad_entropy.reshape(-1).to(rows.dtype)
        logits_rows = row_view(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype)
        math.module.row_gradient(logits_rows, flat_targets, rows, inv_temperature, ignore_index, grad)
        return (grad.view(logits.shape),) + (None,) * 4


def token_logprobs(logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    """The C++ backend of ``ops.token_logprobs``: logits (N, V) or (B, T, V) on the CPU."""
    math = row_math()
    inv_temperature = inverse_temperature(temperature, compute_dtype(logits))
    logp, entropy = _TokenLogprobs.apply(logits, targets, inv_temperature, ignore_index, math)
    return (logp, entropy) if return_entropy else logp
