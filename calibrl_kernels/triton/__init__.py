"""The Triton backend (one module per op: logprobs, group_stats, loss, linear):
``OPS`` (op name -> function under the backend contract of ``_dispatch``) and ``availability``.

Importing this module imports triton and builds the kernels; ``_dispatch`` does so on first use only,
so ``import calibrl_kernels`` never imports triton. Kernels run natively on CUDA tensors, and on CPU
tensors under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton
is first imported: triton decides per kernel, when the kernel is defined, whether it is interpreted.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._launch import BUILT_FOR_INTERPRETER
from .group_stats import group_advantages
from .linear import fused_linear_calibrl_loss, linear_token_logprobs
from .logprobs import token_logprobs
from .loss import fused_calibrl_loss

OPS = {
    "token_logprobs": token_logprobs,
    "group_advantages": group_advantages,
    "fused_calibrl_loss": fused_calibrl_loss,
    "linear_token_logprobs": linear_token_logprobs,
    "fused_linear_calibrl_loss": fused_linear_calibrl_loss,
}


def interpreted() -> bool:
    """Whether this process's kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    return BUILT_FOR_INTERPRETER


def availability(device: torch.device) -> Tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and if not, why."""
    device = torch.device(device)
    if device.type == "cuda":
        if interpreted():
            return True, "interpreted (TRITON_INTERPRET=1): correct but slow"
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch"
        return True, ""
    if device.type == "cpu":
        if interpreted():
            return True, ""
        return False, (
            "Triton kernels run on CPU tensors only under Triton's interpreter; set TRITON_INTERPRET=1 "
            "before triton is first imported (this process imported it without)"
        )
    return False, f"Triton kernels do not run on {device.type} tensors"
