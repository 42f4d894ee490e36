"""Shared builders for the CPU-path tests (coefficients, chunked linear path, C++ backend, modules)."""

from __future__ import annotations

import itertools
from typing import Dict, NamedTuple

import torch

from calibrl_kernels import reference
from calibrl_kernels.config import ACTIVATIONS, LOSS_AGG_MODES, MODES, CalibRLConfig

# One config per (mode, activation) pair that makes sense, plus the aggregation modes and options.
CONFIGS: Dict[str, CalibRLConfig] = {}
for _mode in MODES:
    CONFIGS[_mode] = CalibRLConfig(mode=_mode)
for _act in ACTIVATIONS:
    CONFIGS[f"calibrl-{_act}"] = CalibRLConfig(activation=_act)
for _agg in LOSS_AGG_MODES:
    CONFIGS[f"calibrl-{_agg}"] = CalibRLConfig(loss_agg_mode=_agg, entropy_coef=0.01)
CONFIGS["calibrl-options"] = CalibRLConfig(
    mask_beyond_expert=True, weight_by_advantage=False, entropy_coef=0.05, baseline="sequence-mean",
    loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=7.0, clip_low=0.1, clip_high=0.3, guide_coef=0.5,
)
CONFIGS["luffy-entropy-seqmean"] = CalibRLConfig(mode="luffy", entropy_coef=0.02, loss_agg_mode="seq-mean-token-mean")
CONFIGS["rlplus-entropy"] = CalibRLConfig(mode="rlplus", entropy_coef=-0.03)
CONFIGS["grpo-preset"] = CalibRLConfig.for_algo("grpo", entropy_coef=0.01)


class Batch(NamedTuple):
    """An RL batch of B rows x T tokens in groups of rows_per_group on-policy rows + 1 expert row."""

    old_logp: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) float 0/1
    expert_logp: torch.Tensor  # (B, T) or (B,)
    expert_mask: torch.Tensor  # (B, T) bool
    passed: torch.Tensor  # (B,) bool
    is_expert: torch.Tensor  # (B,) bool

    def kwargs(self, config: CalibRLConfig) -> dict:
        """Keyword arguments of the loss ops for this batch."""
        return dict(
            expert_logp=self.expert_logp, passed=self.passed, is_expert=self.is_expert,
            expert_mask=self.expert_mask, config=config,
        )


def make_batch(groups: int, rows_per_group: int, T: int, *, config: CalibRLConfig, dtype=torch.float64,
               seed: int = 0, all_masked: bool = False) -> Batch:
    """A batch with one expert row per group, partially masked rows, a fully masked row, mixed pass flags."""
    g = torch.Generator().manual_seed(seed)
    B = groups * (rows_per_group + 1)
    group_ids = torch.arange(groups).repeat_interleave(rows_per_group + 1)
    is_expert = torch.zeros(B, dtype=torch.bool)
    is_expert[rows_per_group::rows_per_group + 1] = True
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    if B > 2:
        mask[1] = 0  # a fully masked on-policy row
    if all_masked:
        mask.zero_()
    scores = (torch.rand(B, generator=g) > 0.5).to(dtype) + 0.1 * (torch.rand(B, generator=g) > 0.3).to(dtype)
    stats = reference.group_advantages(scores, group_ids, is_expert=is_expert, norm_by_std=config.norm_by_std)
    old_logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3.0
    expert_logp, expert_mask = reference.expert_baseline(
        old_logp, mask, group_ids, is_expert, kind=config.baseline, return_mask=True
    )
    if config.baseline == "sequence-mean":
        expert_logp = expert_logp[:, 0].contiguous()
    return Batch(old_logp, stats.advantages.to(dtype), mask, expert_logp.to(dtype), expert_mask, stats.passed, is_expert)


def token_values_with_ties(batch: Batch, dtype=torch.float64, seed: int = 1):
    """logp and entropy (B, T) near old_logp, with exact ties planted: lp == old_lp (ratio 1),
    lp == baseline (guide z = 0), |lp - baseline| == 1 (huber kink), lp - old_lp == +-20 (clamp bounds),
    far-out ratios (clipped and dual-clipped)."""
    g = torch.Generator().manual_seed(seed)
    old = batch.old_logp.to(dtype)
    B, T = old.shape
    logp = old + 0.6 * torch.randn(B, T, generator=g, dtype=dtype)
    baseline = batch.expert_logp.to(dtype)
    baseline = baseline[:, None].expand(B, T) if baseline.dim() == 1 else baseline
    pattern = itertools.cycle(range(8))
    for row in range(B):
        for t in range(T):
            kind = next(pattern)
            if kind == 0:
                logp[row, t] = old[row, t]
            elif kind == 1:
                logp[row, t] = baseline[row, t]
            elif kind == 2:
                logp[row, t] = baseline[row, t] + (1.0 if t % 2 else -1.0)
            elif kind == 3:
                logp[row, t] = old[row, t] + (20.0 if t % 2 else -20.0)
            elif kind == 4:
                logp[row, t] = old[row, t] + (2.5 if t % 2 else -2.5)
    entropy = torch.rand(B, T, generator=g, dtype=dtype) * 4.0
    return logp, entropy


def assert_loss_outputs_close(actual, expected, rtol, atol, what=""):
    """Every LossOutput field close (nan == nan)."""
    for name in expected._fields:
        a, e = getattr(actual, name), getattr(expected, name)
        torch.testing.assert_close(
            a.to(torch.float64), e.to(torch.float64), rtol=rtol, atol=atol, equal_nan=True,
            msg=lambda m, name=name: f"{what} LossOutput.{name}: {m}",
        )
