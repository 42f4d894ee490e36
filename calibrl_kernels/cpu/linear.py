"""The lm_head ops on the C++ kernels: the chunked driver (``calibrl_kernels.chunked``) with ``CppRowMath``
(statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from .. import _torch_backend, chunked
from ..config import LossOutput
from ._rows import row_math


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, *, chunk_bytes=None):
    math = row_math()
    if math is None:
        return _torch_backend.OPS["linear_token_logprobs"](
            hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_bytes=chunk_bytes
        )
    return chunked.linear_token_logprobs(
        hidden, weight, targets, bias, temperature, ignore_index, return_entropy, row_math=math, chunk_bytes=chunk_bytes
    )


def fused_linear_calibrl_loss(hidden, weight, targets, old_logp, advantages, mask, *, chunk_bytes=None, **kwargs) -> LossOutput:
    math = row_math()
    if math is None:
        return _torch_backend.OPS["fused_linear_calibrl_loss"](
            hidden, weight, targets, old_logp, advantages, mask, chunk_bytes=chunk_bytes, **kwargs
        )
    return chunked.fused_linear_calibrl_loss(
        hidden, weight, targets, old_logp, advantages, mask, row_math=math, chunk_bytes=chunk_bytes, **kwargs
    )
