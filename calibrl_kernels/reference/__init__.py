"""Torch reference of every public op: the semantics all fused backends reproduce.

``logprobs`` (token_logprobs, linear_token_logprobs), ``group_stats`` (group_advantages, expert_baseline),
``loss`` (calibrl_loss and its fused twins, aggregation, the gradient-coefficient oracle) and
``coefficients`` (the closed-form per-token terms and the token / row tables every fused backend shares).
Formulas: docs of the method (paper arXiv 2602.20197 and the authors' verl-based code).
"""

from .group_stats import expert_baseline, group_advantages
from .logprobs import (
    compute_dtype,
    inverse_temperature,
    linear_logits,
    linear_token_logprobs,
    representable_temperature,
    token_logprobs,
)
from .loss import (
    aggregate,
    aggregation_weights,
    calibrl_loss,
    expert_token_term,
    fused_calibrl_loss,
    fused_linear_calibrl_loss,
    gradient_coefficients,
    guide_activation,
    masked_token_mean,
    ppo_token_terms,
)

__all__ = [
    "aggregate",
    "aggregation_weights",
    "calibrl_loss",
    "compute_dtype",
    "expert_baseline",
    "expert_token_term",
    "fused_calibrl_loss",
    "fused_linear_calibrl_loss",
    "gradient_coefficients",
    "group_advantages",
    "guide_activation",
    "inverse_temperature",
    "linear_logits",
    "linear_token_logprobs",
    "masked_token_mean",
    "ppo_token_terms",
    "representable_temperature",
    "token_logprobs",
]
