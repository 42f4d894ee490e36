"""The torch backend: the reference implementation, available everywhere."""

from __future__ import annotations

from typing import Tuple

import torch

from . import reference

OPS = {
    "token_logprobs": reference.token_logprobs,
    "linear_token_logprobs": reference.linear_token_logprobs,
    "group_advantages": reference.group_advantages,
    "fused_calibrl_loss": reference.fused_calibrl_loss,
    "fused_linear_calibrl_loss": reference.fused_linear_calibrl_loss,
}


def availability(device: torch.device) -> Tuple[bool, str]:
    return True, ""
