"""The loss / advantage registry: each algorithm is a CalibRLConfig preset plus a few trainer choices.

Everything numerical goes through ``calibrl_kernels``' public API:
- group statistics and advantages: ``group_advantages`` (on-policy rows only, expert row excluded);
- the expert baseline b: ``expert_baseline`` (the expert row's old log-probs, by position or mean);
- the loss: ``fused_linear_calibrl_loss`` on final hidden states and the lm_head weight;
- the supervised warm start: ``linear_token_logprobs``.
None of them forms the (rows, T, V) logits.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, GroupStats, LossOutput
from calibrl_kernels.config import ALGORITHM_PRESETS, LossInputs

IGNORE_INDEX = -100  # target value of padding positions (no log-prob, no loss)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str  # registry key (--algo)
    loss: CalibRLConfig  # the loss preset with the run's overrides
    long_sft: bool  # sft+grpo: a longer supervised stage before RL (warm start + extra_sft_steps)
    summary: str  # one line for logs and --help


# Algorithms whose supervised stage is longer (warm start + extra_sft_steps) before RL.
LONG_SFT_ALGOS = ("sft+grpo",)
# --algo name -> (long supervised stage, summary), from calibrl_kernels' one table of algorithms.
REGISTRY: Dict[str, Tuple[bool, str]] = {
    name: (name in LONG_SFT_ALGOS, preset.summary) for name, preset in ALGORITHM_PRESETS.items()
}


def make_algorithm(name: str, loss_overrides: Optional[dict] = None) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"algo: expected one of {tuple(REGISTRY)}, got {name!r}")
    long_sft, summary = REGISTRY[name]
    return Algorithm(name, CalibRLConfig.for_algo(name, **(loss_overrides or {})), long_sft, summary)


def group_statistics(
    rewards: torch.Tensor, group_ids: torch.Tensor, is_expert: torch.Tensor, loss: CalibRLConfig
) -> GroupStats:
    """Advantages (B,), |A| weights (B,), pass flags (B,) and per-group mean / std / pass rate (G,)."""
    return ck.group_advantages(
        rewards,
        group_ids,
        is_expert=is_expert,
        norm_by_std=loss.norm_by_std,
        eps=loss.adv_eps,
        pass_threshold=loss.pass_threshold,
    )


def expert_baseline(
    old_logp: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor, is_expert: torch.Tensor, loss: CalibRLConfig
) -> Tuple[torch.Tensor, torch.Tensor]:
    """b (B, T) from each group's expert row (its OLD log-probs) and the expert's token mask (B, T) bool."""
    return ck.expert_baseline(old_logp, mask, group_ids, is_expert, kind=loss.baseline, return_mask=True)


def policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    inputs: LossInputs,
    loss: CalibRLConfig,
) -> LossOutput:
    """The algorithm's loss of R rows from hidden (R, T, D) and the lm_head weight (V, D) [+ bias (V,)].

    targets (R, T) with ``inputs.ignore_index`` (IGNORE_INDEX) on padding; ``inputs``: old_logp, mask (R, T);
    advantages, passed, is_expert (R,); expert_logp (the baseline b) and expert_mask (R, T), each handed on
    only when the loss uses it (guide term, mask_beyond_expert). The trainer integrations of
    ``calibrl.integrations`` call this same function, so every path computes one loss.
    """
    return ck.fused_linear_calibrl_loss(
        hidden,
        weight.to(hidden.dtype),
        targets,
        inputs.old_logp,
        inputs.advantages,
        inputs.mask,
        bias=None if bias is None else bias.to(hidden.dtype),
        expert_logp=inputs.expert_logp if loss.uses_guide else None,
        passed=inputs.passed,
        is_expert=inputs.is_expert,
        expert_mask=inputs.expert_mask if loss.mask_beyond_expert else None,
        ignore_index=inputs.ignore_index,
        config=loss,
    )


def response_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """(R, T) log-probs of targets (R, T) (0 where IGNORE_INDEX) from hidden (R, T, D) and the head (V, D)
    [and the (R, T) entropy at each position, 0 where IGNORE_INDEX]."""
    return ck.linear_token_logprobs(
        hidden,
        weight.to(hidden.dtype),
        targets,
        bias=None if bias is None else bias.to(hidden.dtype),
        temperature=temperature,
        ignore_index=IGNORE_INDEX,
        return_entropy=return_entropy,
    )


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-mean negative log-likelihood of targets (R, T) (IGNORE_INDEX on padding) and the token count."""
    logp = response_logprobs(hidden, weight, bias, targets, temperature)  # (R, T), 0 on padding
    tokens = (targets != IGNORE_INDEX).sum()
    return -logp.sum() / tokens.clamp_min(1), tokens


def expert_keep_mask(
    group_index: torch.Tensor,
    is_expert: torch.Tensor,
    pass_rate: torch.Tensor,
    policy: str,
    mix_ratio: float,
    low: float,
    high: float,
) -> torch.Tensor:
    """(B,) bool rows to keep: all on-policy rows, and each group's expert row per the mixup policy.

    policy 'always': keep the expert row with probability mix_ratio (one draw per group);
    policy 'pass': keep it when the group's on-policy pass rate (G,) lies in [low, high].
    """
    if policy == "always" and mix_ratio < 1.0:
        group_keeps = torch.rand(pass_rate.shape[0]) < mix_ratio
    elif policy == "always":
        group_keeps = torch.ones_like(pass_rate, dtype=torch.bool)
    else:
        group_keeps = (pass_rate >= low) & (pass_rate <= high)
    return ~is_expert | group_keeps[group_index]
