"""fused_calibrl_loss on the C++ kernels: forward = one pass per row with the closed-form coefficients
(row_loss); backward = one pass writing dlogits with a, b scaled by the incoming gradient. The logits are read
twice and the gradient written once, with no (N, V) temporary.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import CalibRLConfig
from ..reference import compute_dtype, inverse_temperature
from ..reference.coefficients import ROW
from ._rows import row_math, row_table, row_view
from .logprobs import flat_ids


def fused_calibrl_loss(logits, targets, table, config: CalibRLConfig, ignore_index: int) -> torch.Tensor:
    """logits (B, T, V) on the CPU, targets (B, T), table from ``coefficients.loss_token_table`` -> the
    (N, ROW_FIELDS) row table (statistics, closed-form coefficients and loss terms per token)."""
    flat_targets = flat_ids(targets)
    rows = row_table(flat_targets.numel(), logits)
    inv_temperature = inverse_temperature(config.temperature, compute_dtype(logits))
    row_math().loss(row_view(logits), flat_targets, table, rows, config, inv_temperature, ignore_index, False)
    return rows


def fused_calibrl_loss_backward(
    logits, targets, rows, grad_loss, config: CalibRLConfig, ignore_index: int, out: Optional[torch.Tensor]
) -> torch.Tensor:
    """dL/dlogits from the forward's row table, a and b scaled by the incoming gradient. out=logits (unit
    stride along V) writes it over the logits buffer: row_gradient reads each row before overwriting it."""
    rows = rows.clone()
    rows[:, ROW["coef_a"]] *= grad_loss.to(rows.dtype)
    rows[:, ROW["coef_b"]] *= grad_loss.to(rows.dtype)
    inv_temperature = inverse_temperature(config.temperature, compute_dtype(logits))
    grad = torch.empty(logits.shape, dtype=logits.dtype) if out is None else out
    row_math().module.row_gradient(
        row_view(logits.detach()), flat_ids(targets), rows, inv_temperature, ignore_index, grad
    )
    return grad
