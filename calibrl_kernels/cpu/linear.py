"""The lm_head ops on the C++ kernels: the chunked driver (``calibrl_kernels.chunked``) with ``CppRowMath``
(statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from .. import chunked
from ._rows import row_math

KERNELS = chunked.kernels(row_math)
