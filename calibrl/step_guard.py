"""Non-finite steps: an optimizer step whose loss or gradient is not finite never touches the weights.

A reward that overflows, a learning rate that diverges or a kernel fault can make one step's loss or
gradient NaN / inf. One such optimizer step would write NaN into every weight and every Adam moment, and
the next checkpoint would keep them. ``NonFiniteGuard`` decides, before each optimizer step, whether the
step may run: every process contributes a flag (its loss finite, the gradient norm finite) and the flags
are all-reduced, so under DDP all processes skip the same steps and their weights stay identical. A
skipped step leaves weights, optimizer moments and learning-rate schedule as they were (like the
gradient scaler of mixed precision); it is counted, and ``max_bad_steps`` training steps in a row with
a skipped update stop the run, with the last good state checkpointed.
"""

from __future__ import annotations

import math
from typing import Any, List

import torch

from . import distributed
from .checkpoint import iter_tensors


class TooManyBadSteps(RuntimeError):
    """``max_bad_steps`` training steps in a row had their updates skipped; the last good state is saved."""


class NonFiniteGuard:
    """Counts the optimizer steps skipped for a non-finite loss or gradient, per training step and in a row."""

    def __init__(self, max_bad_steps: int, dist: distributed.DistInfo):
        self.max_bad_steps = max_bad_steps
        self.dist = dist
        self.skipped = 0  # optimizer steps skipped in the current training step
        self.bad_in_row = 0  # training steps in a row with at least one skipped optimizer step
        self.total_skipped = 0  # over the whole run (this process's lifetime)

    def step_is_finite(self, loss_finite: bool, grad_norm: float) -> bool:
        """Whether the optimizer step may run: the loss and gradient norm are finite on every process."""
        bad = float(not (loss_finite and math.isfinite(grad_norm)))
        bad = distributed.all_reduce_max(torch.tensor([bad], device=self.dist.device), self.dist).item()
        if bad:
            self.skipped += 1
            self.total_skipped += 1
        return not bad

    def end_step(self) -> int:
        """Close a training step: the number of its skipped optimizer steps (logged as ``skipped_updates``)."""
        skipped, self.skipped = self.skipped, 0
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        return skipped

    @property
    def should_stop(self) -> bool:
        return self.bad_in_row >= self.max_bad_steps


def nonfinite_tensors(state: Any, name: str = "state") -> List[str]:
    """Names of the floating-point tensors of a (nested) state dict holding NaN or inf."""
    return [
        key
        for key, tensor in iter_tensors(state, name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
