"""calibrl_kernels: fused log-prob / entropy / group-statistics / CalibRL-loss ops for PyTorch.

Public API (see docs/api.md): token_logprobs, linear_token_logprobs, group_advantages, expert_baseline,
calibrl_loss, fused_calibrl_loss, fused_linear_calibrl_loss, CalibRLConfig, GroupStats, LossOutput,
and the modules CalibRLLoss / LinearCalibRLLoss.
``calibrl_kernels.reference`` holds the torch reference of every op; ``calibrl_kernels.library`` registers the
kernels as ``torch.ops.calibrl.*`` custom operators (torch.compile / torch.export, see docs/compile.md).
"""

from . import library  # noqa: F401  (registers the calibrl:: custom operators, torch.ops.calibrl.*)
from ._version import __version__
from .config import CalibRLConfig, GroupStats, LossOutput
from .modules import CalibRLLoss, LinearCalibRLLoss
from .ops import (
    calibrl_loss,
    expert_baseline,
    fused_calibrl_loss,
    fused_linear_calibrl_loss,
    group_advantages,
    linear_token_logprobs,
    token_logprobs,
)

__all__ = [
    "__version__",
    "CalibRLConfig",
    "CalibRLLoss",
    "LinearCalibRLLoss",
    "GroupStats",
    "LossOutput",
    "calibrl_loss",
    "expert_baseline",
    "fused_calibrl_loss",
    "fused_linear_calibrl_loss",
    "group_advantages",
    "linear_token_logprobs",
    "token_logprobs",
]
