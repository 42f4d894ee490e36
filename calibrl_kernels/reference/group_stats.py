"""Torch reference of group_advantages and expert_baseline (scatter / index_add, no Python loops).

The value checks that need a computed quantity (a group without on-policy rows, a group without exactly
one expert row) run here; everything else is validated by ``calibrl_kernels.ops``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from ..config import GroupStats
from .logprobs import compute_dtype


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: Optional[torch.Tensor] = None,
    norm_by_std: bool = False,
    eps: float = 1e-6,
    pass_threshold: float = 0.1,
    num_groups: Optional[int] = None,
) -> GroupStats:
    """Group mean / unbiased std / pass rate over on-policy rows, advantages for every row.

    scores (B,) rewards, group_ids (B,) any integers, is_expert (B,) bool or None (all on-policy).
    A group with one on-policy row uses mean 0 and std 1; a group with none raises ValueError.
    num_groups (optional): the number of distinct ids, checked (value check) here; fused backends use
    it to avoid a host synchronisation.
    """
    dt = compute_dtype(scores)
    r = scores.to(dt)  # (B,)
    on_policy = torch.ones_like(r, dtype=torch.bool) if is_expert is None else ~is_expert  # (B,)
    group_index, group_keys = group_positions(group_ids, num_groups)  # (B,), (G,)
    num_groups = group_keys.numel()
    on_f = on_policy.to(dt)

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:  # (B,) -> (G,)
        return torch.zeros(num_groups, dtype=values.dtype, device=r.device).index_add_(0, group_index, values)

    count = per_group_sum(on_policy.long())  # (G,)
    _checks.check_every_group_has_on_policy_rows(count, group_keys)
    count_f = count.to(dt)
    # Expert rows' scores are not read (where, not * on_f: a NaN expert score must not poison its group).
    zero = torch.zeros((), dtype=dt, device=r.device)
    raw_mean = per_group_sum(torch.where(on_policy, r, zero)) / count_f.clamp_min(1)  # (G,)
    deviation = torch.where(on_policy, r - raw_mean[group_index], zero)  # (B,) two-pass variance for accuracy
    raw_std = (per_group_sum(deviation * deviation) / (count_f - 1).clamp_min(1)).sqrt()
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(raw_mean), raw_mean)  # (G,)
    std = torch.where(single, torch.ones_like(raw_std), raw_std)  # (G,)
    passed = r > pass_threshold  # (B,)
    pass_rate = per_group_sum(passed.to(dt) * on_f) / count_f.clamp_min(1)  # (G,)
    advantages = r - mean[group_index]  # (B,)
    if norm_by_std:
        advantages = advantages / (std[group_index] + eps)
    return GroupStats(
        advantages=advantages,
        weights=advantages.abs(),
        passed=passed,
        mean=mean,
        std=std,
        pass_rate=pass_rate,
        count=count,
        group_index=group_index,
        group_keys=group_keys,
    )


def group_positions(group_ids: torch.Tensor, num_groups: Optional[int] = None):
    """(group_index (B,), group_keys (G,)): each row's group position (ascending id) and the distinct ids.

    Without num_groups: torch.unique (its output size depends on the data). With num_groups: sort, cumsum
    and scatter, whose shapes are known in advance (no host synchronisation, traceable by torch.compile);
    num_groups is checked against the data while value checks are on, and positions are clamped below it
    so that a wrong count can never index out of bounds.
    """
    if num_groups is None:
        group_keys, group_index = torch.unique(group_ids, sorted=True, return_inverse=True)
        return group_index, group_keys
    sorted_ids, order = torch.sort(group_ids, stable=True)  # (B,), (B,)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_index = torch.cumsum(new_run, 0) - 1  # (B,) group position of each sorted row
    if _checks.value_checks_enabled():
        _checks.check_num_groups(num_groups, int(run_index[-1]) + 1)
    run_index = run_index.clamp_max(num_groups - 1)
    group_index = torch.empty_like(run_index).scatter_(0, order, run_index)  # (B,)
    group_keys = torch.zeros(num_groups, dtype=group_ids.dtype, device=group_ids.device)
    group_keys.scatter_(0, run_index, sorted_ids)  # (G,) every row of a run writes the same id
    return group_index, group_keys


def expert_baseline(
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    kind: str = "position",
    return_mask: bool = False,
    num_groups: Optional[int] = None,
):
    """The expert baseline b (B, T) of every row, from its group's expert row (exactly one per group).

    kind="position" (authors' code): b[i, t] = old_logp[e, t] of the group's expert row e, and 0 past
    the expert's length (mask[e, t] == 0). kind="sequence-mean": the expert's mean token log-prob,
    the same value at every t. With return_mask, also the expert's token mask mask[e] (B, T) bool,
    used by ``mask_beyond_expert``. num_groups: see ``group_positions``.
    """
    if kind not in ("position", "sequence-mean"):
        raise ValueError(f"kind: expected 'position' or 'sequence-mean', got {kind!r}")
    B, T = old_logp.shape
    dt = compute_dtype(old_logp)
    group_index, group_keys = group_positions(group_ids, num_groups)  # (B,), (G,)
    expert_count = torch.zeros(group_keys.numel(), dtype=torch.long, device=old_logp.device)
    expert_count.index_add_(0, group_index, is_expert.long())
    _checks.check_one_expert_per_group(expert_count, group_keys)
    rows = torch.arange(B, device=old_logp.device)
    # The expert row of each group (a scatter rather than boolean indexing: no data-dependent shapes).
    expert_row_of_group = torch.zeros(group_keys.numel(), dtype=torch.long, device=old_logp.device)
    expert_row_of_group.scatter_reduce_(0, group_index, torch.where(is_expert, rows, 0), reduce="amax")
    expert_row = expert_row_of_group[group_index]  # (B,) the expert row of each row's group
    expert_tokens = mask[expert_row] != 0  # (B, T)
    expert_old = old_logp.detach().to(dt)[expert_row]  # (B, T)
    zeros = torch.zeros_like(expert_old)
    if kind == "position":
        baseline = torch.where(expert_tokens, expert_old, zeros)
    else:
        m = expert_tokens.to(dt)
        seq_mean = (torch.where(expert_tokens, expert_old, zeros)).sum(-1) / m.sum(-1).clamp_min(1)  # (B,)
        baseline = seq_mean[:, None].expand(B, T).contiguous()
    return (baseline, expert_tokens) if return_mask else baseline


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
