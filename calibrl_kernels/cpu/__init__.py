"""The C++/OpenMP CPU backend: one module per op (logprobs, loss, linear), the sources in ``csrc/``, built on
first use by ``build``; ``KERNELS`` (what the ``calibrl::`` operators of ``calibrl_kernels.library`` call),
``OPS`` (the ``_dispatch`` contract, through those operators) and ``availability`` (builds and says whether
the kernels can run; see its docstring).

Ops (the backend contract of ``calibrl_kernels._dispatch``):
- ``token_logprobs``: forward = one pass per row (row_stats); backward = one pass writing dlogits.
- ``fused_calibrl_loss``: forward = one pass per row with the closed-form coefficients (row_loss);
  backward = one pass writing dlogits with a, b scaled by the incoming gradient.
- ``linear_token_logprobs`` / ``fused_linear_calibrl_loss``: the chunked driver of ``calibrl_kernels.chunked``
  with ``CppRowMath`` (statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import library
from . import build, linear, logprobs, loss
from ._rows import build_failure, cpp_forced

# The kernels the calibrl:: operators call (calibrl_kernels.library), by kernel name.
KERNELS = {
    "token_logprobs": logprobs.token_logprobs,
    "token_logprobs_backward": logprobs.token_logprobs_backward,
    "fused_calibrl_loss": loss.fused_calibrl_loss,
    "fused_calibrl_loss_backward": loss.fused_calibrl_loss_backward,
    **linear.KERNELS,
}
# The backend contract of _dispatch: each op through its calibrl:: operator.
OPS = library.backend_ops(
    "cpp", ("token_logprobs", "fused_calibrl_loss", "linear_token_logprobs", "fused_linear_calibrl_loss")
)
token_logprobs = OPS["token_logprobs"]
fused_calibrl_loss = OPS["fused_calibrl_loss"]
linear_token_logprobs = OPS["linear_token_logprobs"]
fused_linear_calibrl_loss = OPS["fused_linear_calibrl_loss"]


def availability(device: torch.device) -> Tuple[bool, str]:
    """CPU tensors only, once the extension is built: it builds here, when the dispatcher first considers
    this backend for an op it implements. After a failed build it is unavailable: the dispatcher then runs
    the torch backend after one warning per process, or raises naming the build error when CALIBRL_IMPL=cpp
    forces this backend (no warning then)."""
    if torch.device(device).type != "cpu":
        return False, f"the C++ kernels run on CPU tensors only, not on {torch.device(device)}"
    if build.extension(fallback_warning=not cpp_forced()) is None:
        return False, build_failure()
    return True, ""
