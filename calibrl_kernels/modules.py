"""``torch.nn.Module`` wrappers of the fused losses, for trainers that prefer modules.

Both hold a ``CalibRLConfig`` (and ``ignore_index``) and call the public ops, so they dispatch like
them (Triton on CUDA, C++ on CPU, torch otherwise) and return the same ``LossOutput``. Neither owns
parameters: the lm_head weight is passed to ``LinearCalibRLLoss`` (it belongs to the model), as in
Liger-Kernel's fused-linear loss modules.

    loss_fn = LinearCalibRLLoss(CalibRLConfig.for_algo("calibrl"))
    out = loss_fn(hidden, model.lm_head.weight, response_ids, old_logp, None, mask,
                  scores=rewards, group_ids=prompt_ids, is_expert=is_expert)
    out.loss.backward()
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, chunked, ops
from .config import DEFAULT_CONFIG, CalibRLConfig, LossOutput


class _ConfiguredLoss(torch.nn.Module):
    def __init__(self, config: Optional[CalibRLConfig] = None, *, ignore_index: int = -100):
        super().__init__()
        config = DEFAULT_CONFIG if config is None else config
        _checks.check_config(config)
        self.config = config
        # As the functional ops: Python or NumPy integers in the int64 range, stored as a Python int.
        self.ignore_index = _checks.as_int("ignore_index", ignore_index)

    def extra_repr(self) -> str:
        return f"config={self.config!r}, ignore_index={self.ignore_index}"

    def _op_options(self) -> dict:
        """The module's settings as keyword arguments of the functional op."""
        return dict(ignore_index=self.ignore_index, config=self.config)


class CalibRLLoss(_ConfiguredLoss):
    """CalibRL loss (or a baseline's, per ``config.mode``) from logits (B, T, V); see ``ops.fused_calibrl_loss``.

    inplace_backward=True (opt-in, every backend): the backward writes dL/dlogits over the logits
    buffer instead of allocating a logits-sized gradient; afterwards the logits tensor holds its
    gradient and must not be used again, and each forward allows one backward only.
    """

    def __init__(
        self, config: Optional[CalibRLConfig] = None, *, ignore_index: int = -100, inplace_backward: bool = False
    ):
        super().__init__(config, ignore_index=ignore_index)
        _checks.check_bool_argument("inplace_backward", inplace_backward)
        self.inplace_backward = inplace_backward

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inplace_backward={self.inplace_backward}"

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: Optional[torch.Tensor],
        mask: torch.Tensor,
        *,
        inplace_backward: Optional[bool] = None,
        **batch_fields,
    ) -> LossOutput:
        """batch_fields: scores, group_ids, expert_logp, passed, is_expert, expert_mask (as the op).

        inplace_backward: None uses the module's setting; True / False overrides it for this call.
        """
        inplace = self.inplace_backward if inplace_backward is None else inplace_backward  # the op checks it
        options = dict(self._op_options(), inplace_backward=inplace)
        return ops.fused_calibrl_loss(logits, targets, old_logp, advantages, mask, **options, **batch_fields)


class LinearCalibRLLoss(_ConfiguredLoss):
    """The loss from hidden states (B, T, D) and the lm_head weight (V, D) [+ bias], without (N, V) logits.

    See ``ops.fused_linear_calibrl_loss``; gradients flow to hidden, weight and bias.

    chunk_bytes: the byte budget of a logits chunk on the CPU chunked path (the cpp and torch backends,
    ``chunked``) for this module's calls; None uses env CALIBRL_CHUNK_BYTES, else
    ``chunked.default_chunk_bytes()`` (1/16 of the machine's memory, 64 MiB to 1 GiB). Chunks take
    512 rows where the budget allows (the GEMMs' knee), fewer below it, so a budget under 512 * V * 4
    bytes costs speed. The Triton GPU path has its own budget and ignores it.
    """

    def __init__(
        self, config: Optional[CalibRLConfig] = None, *, ignore_index: int = -100, chunk_bytes: Optional[int] = None
    ):
        super().__init__(config, ignore_index=ignore_index)
        if chunk_bytes is not None:
            chunked.chunk_budget(chunk_bytes)  # TypeError / ValueError now rather than at the first call
        self.chunk_bytes = chunk_bytes

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_bytes={self.chunk_bytes}"

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: Optional[torch.Tensor],
        mask: torch.Tensor,
        *,
        bias: Optional[torch.Tensor] = None,
        **batch_fields,
    ) -> LossOutput:
        """batch_fields: scores, group_ids, expert_logp, passed, is_expert, expert_mask (as the op)."""
        args = (hidden, weight, targets, old_logp, advantages, mask)
        options = dict(bias=bias, chunk_bytes=self.chunk_bytes, **self._op_options())
        return ops.fused_linear_calibrl_loss(*args, **options, **batch_fields)
