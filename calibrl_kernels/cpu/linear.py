"""The lm_head ops on the C++ kernels: the chunked driver (``calibrl_kernels.chunked``) with ``CppRowMath``
(statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from .. import chunked
from ..config import DEFAULT_CONFIG, CalibRLConfig, LossInputs, LossOutput
from ._rows import row_math


def linear_token_logprobs(
    hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False, *, chunk_bytes=None
):
    """The C++ backend of ``ops.linear_token_logprobs``: the chunked driver with the C++ row math."""
    return chunked.linear_token_logprobs(
        hidden,
        weight,
        targets,
        bias,
        temperature,
        ignore_index,
        return_entropy,
        row_math=row_math(),
        chunk_bytes=chunk_bytes,
    )


def fused_linear_calibrl_loss(
    hidden, weight, targets, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG, bias=None, *, chunk_bytes=None
) -> LossOutput:
    """The C++ backend of ``ops.fused_linear_calibrl_loss``: the chunked driver with the C++ row math."""
    return chunked.fused_linear_calibrl_loss(
        hidden, weight, targets, inputs, config, bias, row_math=row_math(), chunk_bytes=chunk_bytes
    )
