"""What the C++ ops share: the loss parameters the kernels read, the row math of the chunked driver, the
(N, V) row view and the row table.
"""

from __future__ import annotations

import torch

from ..config import KERNEL_CONSTANTS, CalibRLConfig, kernel_scalars
from ..reference import coefficients as coef
from ..reference import compute_dtype
from . import build


def loss_params(config: CalibRLConfig) -> dict:
    """The numeric loss parameters the C++ row_terms reads (by name)."""
    return {**kernel_scalars(config), **KERNEL_CONSTANTS}


class CppRowMath:
    """chunked's row-math interface on the C++ kernels (CPU tensors; chunk is scratch, see TorchRowMath)."""

    name = "cpp"
    buffers_per_chunk = 1  # one pass per row, in place: no chunk-sized temporaries

    def __init__(self, module):
        self.module = module

    def stats(self, logits, targets, inv_temperature, ignore_index, rows):
        self.module.row_stats(logits, targets.long().contiguous(), inv_temperature, ignore_index, rows)

    def loss(self, logits, targets, table, rows, config, inv_temperature, ignore_index, form_gradient):
        self.module.row_loss(
            logits,
            targets.long().contiguous(),
            table,
            rows,
            config.mode,
            config.activation,
            loss_params(config),
            inv_temperature,
            ignore_index,
            form_gradient,
        )

    def gradient(self, logits, targets, rows, inv_temperature, ignore_index):
        self.module.row_gradient(logits, targets.long().contiguous(), rows, inv_temperature, ignore_index, logits)


def cpp_forced() -> bool:
    """Whether CALIBRL_IMPL=cpp forces this backend (then a failed build raises instead of falling back)."""
    from .. import _dispatch

    return _dispatch.requested_impl() == "cpp"


def build_failure() -> str:
    return f"the C++ kernels could not be built: {build.build_error()}"


def row_math() -> CppRowMath:
    """The C++ row math, building the extension on first use. ``_dispatch`` picks this backend only once the
    build succeeded (``availability``); called directly after a failed build it raises naming the error."""
    module = build.extension(fallback_warning=False)
    if module is None:
        how = "was requested (CALIBRL_IMPL=cpp)" if cpp_forced() else "was called directly"
        raise RuntimeError(f"calibrl_kernels: backend 'cpp' {how} but {build_failure()}")
    return CppRowMath(module)


def row_view(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, V) / (B, T, V) as the kernels take them: any strides but a unit one along V (else a copy).

    So a slice such as logits[:, :-1] of a (B, L, V) tensor is read in place, never copied.
    """
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def row_table(num_rows: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(num_rows, len(coef.ROW_FIELDS), dtype=compute_dtype(logits), device=logits.device)
