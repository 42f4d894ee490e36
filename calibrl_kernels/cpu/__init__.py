"""The C++/OpenMP CPU backend: the row kernels of ``csrc/`` (beside this file) on logits, and on the chunks of the linear path.

Importing this module is cheap: the extension is built on the first call of one of its ops
(``build.extension()``). When the build fails:

- by default (cpp picked because the tensors are on the CPU) every op runs the torch backend's
  implementation instead, with the same options (chunk_bytes, inplace_backward), after one warning
  per process; ``availability`` says yes for CPU tensors until a build attempt has failed;
- when ``CALIBRL_IMPL=cpp`` forces this backend, ``availability`` builds at once, so that every call,
  the first included, raises the RuntimeError naming the build error (no silent torch run).

Ops (reference signatures):
- ``token_logprobs``: forward = one pass per row (row_stats); backward = one pass writing dlogits.
- ``fused_calibrl_loss``: forward = one pass per row with the closed-form coefficients (row_loss);
  backward = one pass writing dlogits with a, b scaled by the incoming gradient. So the logits are
  read twice and the gradient written once, with no (N, V) temporary.
- ``linear_token_logprobs`` / ``fused_linear_calibrl_loss``: the chunked driver of ``calibrl_kernels.chunked`` with
  ``CppRowMath`` (statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import build
from ._rows import build_failure, cpp_forced
from .linear import fused_linear_calibrl_loss, linear_token_logprobs
from .logprobs import token_logprobs
from .loss import fused_calibrl_loss


OPS = {
    "token_logprobs": token_logprobs,
    "fused_calibrl_loss": fused_calibrl_loss,
    "linear_token_logprobs": linear_token_logprobs,
    "fused_linear_calibrl_loss": fused_linear_calibrl_loss,
}


def availability(device: torch.device) -> Tuple[bool, str]:
    """CPU tensors only, and only while the extension has not failed to build.

    It builds on the first op call, or here already when CALIBRL_IMPL=cpp forces this backend, so that
    a forced backend that cannot build is refused from the first call on.
    """
    if torch.device(device).type != "cpu":
        return False, f"the C++ kernels run on CPU tensors only, not on {torch.device(device)}"
    forced = cpp_forced()
    if not build.attempted() and forced:
        build.extension(fallback_warning=False)
    if build.attempted() and build.build_error() is not None:
        if not forced:
            build.extension()  # the dispatcher falls back to torch: the process's one warning, if not given yet
        return False, build_failure()
    return True, ""
