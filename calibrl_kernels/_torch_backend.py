"""The torch backend, available everywhere: the reference, except for the lm_head ops.

``linear_token_logprobs`` and ``fused_linear_calibrl_loss`` use the chunked path of ``chunked``
(torch row math, any device), which never materialises the (N, V) logits; their reference twins,
which do, stay in ``reference``.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import chunked, reference

OPS = {
    "token_logprobs": reference.token_logprobs,
    "linear_token_logprobs": chunked.linear_token_logprobs,
    "group_advantages": reference.group_advantages,
    "fused_calibrl_loss": reference.fused_calibrl_loss,
    "fused_linear_calibrl_loss": chunked.fused_linear_calibrl_loss,
}


def availability(device: torch.device) -> Tuple[bool, str]:
    return True, ""
