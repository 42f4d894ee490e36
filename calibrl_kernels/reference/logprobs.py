"""Torch reference of token_logprobs / linear_token_logprobs and the dtype / temperature helpers.

Logits are materialised and autograd gives the gradients; computation is in float32 (float64 for float64
inputs). Inputs are not checked here: ``calibrl_kernels.ops`` validates them before any backend runs.
"""

from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 when given float64, float32 otherwise (bf16/fp16 inputs are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def representable_temperature(temperature: float, dtype: torch.dtype) -> float:
    """temperature clamped to the positive normal range of ``dtype`` (the compute dtype).

    Dividing an fp32 tensor by 1e300 divides by inf (the scalar is rounded to fp32), which turns a -inf
    logit into NaN; the clamped value gives the same logits / T wherever that quotient is representable
    (T = 1e300 gives the uniform distribution, as the fp64 reference does)."""
    info = torch.finfo(dtype)
    return min(max(float(temperature), info.tiny), info.max)


def inverse_temperature(temperature: float, dtype: torch.dtype = torch.float32) -> float:
    """1 / temperature clamped to the positive normal range of ``dtype``, for kernels that multiply by it:
    never 0 (x * 0 would turn a -inf logit into NaN) and never inf (it would turn a logit of 0 into NaN)."""
    info = torch.finfo(dtype)
    return min(max(1.0 / float(temperature), info.tiny), info.max)


# --------------------------------------------------------------------------------------------
# Token log-probs and entropy
# --------------------------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / temperature)[target] and the entropy of that distribution.

    logits (..., V), targets (...) -> logp (...) [, entropy (...)], float32 (float64 for float64 input).
    Positions whose target is ``ignore_index`` are not read: logp = entropy = 0 and an exactly zero
    gradient, whatever their logits hold (NaN padding included), as in the fused backends.
    Entries of -inf in the logits (a masked vocabulary) are allowed; a row whose logits are ALL -inf
    has no distribution, and a row holding a NaN or +inf logit none either: such a row's outputs and
    gradient are NaN (as torch's log_softmax), other rows are unaffected.
    """
    targets = targets.long()  # compared as integers: uint8 targets never wrap ignore_index (-100 -> 156)
    valid = targets != ignore_index  # (...)
    dt = compute_dtype(logits)
    z = logits.to(dt) / representable_temperature(temperature, dt)  # (..., V)
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros_like(z))  # ignored rows never read
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(z, dim=-1)  # (..., V)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    # H = -sum_j p_j log p_j: every term is >= 0 (log_softmax <= 0), so H >= 0 even where lse - sum_j p_j z_j
    # cancels (T = 1e-3: -2e-3); a -inf logit has p_j = 0 and contributes nothing (0 * -inf guarded, also in
    # the gradient); a NaN row stays NaN.
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden (..., D) @ weight (V, D)^T + bias (V,) in the compute dtype -> (..., V)."""
    dt = compute_dtype(hidden)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    return logits


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """token_logprobs of the lm_head logits, computed through explicit logits (the reference)."""
    return token_logprobs(linear_logits(hidden, weight, bias), targets, temperature, ignore_index, return_entropy)


# --------------------------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------------------------
