"""The Triton backend (one module per op: logprobs, group_stats, loss, linear):
``KERNELS`` (what the ``calibrl::`` operators of ``calibrl_kernels.library`` call), ``OPS`` (op name ->
function under the backend contract of ``_dispatch``, through those operators) and ``availability``.

Importing this module imports triton and builds the kernels; ``_dispatch`` does so on first use only,
so ``import calibrl_kernels`` never imports triton. Kernels run natively on CUDA tensors, and on CPU
tensors under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton
is first imported: triton decides per kernel, when the kernel is defined, whether it is interpreted.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import library
from . import group_stats, linear, logprobs, loss
from ._launch import BUILT_FOR_INTERPRETER

# The kernels the calibrl:: operators call (calibrl_kernels.library), by kernel name.
KERNELS = {
    "token_logprobs": logprobs.token_logprobs,
    "token_logprobs_backward": logprobs.token_logprobs_backward,
    "fused_calibrl_loss": loss.fused_calibrl_loss,
    "fused_calibrl_loss_backward": loss.fused_calibrl_loss_backward,
    "linear_token_logprobs": linear.linear_token_logprobs,
    "linear_token_logprobs_backward": linear.linear_token_logprobs_backward,
    "fused_linear_calibrl_loss": linear.fused_linear_calibrl_loss,
    "fused_linear_calibrl_loss_backward": linear.fused_linear_calibrl_loss_backward,
    "group_advantages": group_stats.group_advantages,
}
# The backend contract of _dispatch: each op through its calibrl:: operator.
OPS = library.backend_ops(
    "triton",
    ("token_logprobs", "group_advantages", "fused_calibrl_loss", "linear_token_logprobs", "fused_linear_calibrl_loss"),
)
token_logprobs = OPS["token_logprobs"]
group_advantages = OPS["group_advantages"]
fused_calibrl_loss = OPS["fused_calibrl_loss"]
linear_token_logprobs = OPS["linear_token_logprobs"]
fused_linear_calibrl_loss = OPS["fused_linear_calibrl_loss"]


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
