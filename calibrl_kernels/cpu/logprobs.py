"""token_logprobs on the C++ kernels: forward = one pass per row (row_stats); backward = one pass writing dlogits."""

from __future__ import annotations

import torch

from ..reference import compute_dtype, inverse_temperature
from ..reference.coefficients import ROW
from ._rows import row_math, row_table, row_view


def flat_ids(targets: torch.Tensor) -> torch.Tensor:
    """targets as the kernels read them: (N,) contiguous int64."""
    return targets.reshape(-1).long().contiguous()


def token_logprobs(logits, targets, temperature, ignore_index) -> torch.Tensor:
    """logits (N, V) or (B, T, V) on the CPU -> the (N, ROW_FIELDS) row table (logp, entropy, lse ...)."""
    flat_targets = flat_ids(targets)
    rows = row_table(flat_targets.numel(), logits)
    inv_temperature = inverse_temperature(temperature, compute_dtype(logits))
    row_math().module.row_stats(row_view(logits), flat_targets, inv_temperature, ignore_index, rows)
    return rows


def token_logprobs_backward(logits, targets, rows, grad_logp, grad_entropy, temperature, ignore_index) -> torch.Tensor:
    """dL/dlogits from the forward's row table and the incoming gradients of logp and entropy."""
    rows = rows.clone()
    rows[:, ROW["coef_a"]] = -grad_logp.reshape(-1).to(rows.dtype)
    rows[:, ROW["coef_b"]] = -grad_entropy.reshape(-1).to(rows.dtype)
    inv_temperature = inverse_temperature(temperature, compute_dtype(logits))
    grad = torch.empty(logits.shape, dtype=logits.dtype)
    row_math().module.row_gradient(row_view(logits), flat_ids(targets), rows, inv_temperature, ignore_index, grad)
    return grad
