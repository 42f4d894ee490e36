"""Group statistics and advantages on the device (Triton), with no Python loop over groups.

Group ids are arbitrary integers. They are remapped on the device: a stable sort puts each group's
rows next to each other, run boundaries (sorted id differs from its predecessor) and a cumulative sum
number the groups 0..G-1 in ascending id order, and a scatter-min gives each group's first sorted
position. Everything lives in B-sized buffers (G <= B is not known on the host), and one kernel
program per buffer slot g streams its group's rows (slots past G have empty runs and exit at once):
count, mean, unbiased std (two-pass, like the reference), pass rate, then every row's advantage
A = r - mean (or (r - mean) / (std + eps)), |A| and group index.

The GroupStats contract holds (G,)-shaped per-group tensors, and cutting the buffers to G needs G on
the host: that is the one synchronisation of this op, isolated in ``_group_count``. Pass
``num_groups`` (e.g. the number of prompts of the batch, known to the trainer) to avoid it; with
value checks on (``CALIBRL_VALUE_CHECKS`` unset) it is verified, which synchronises anyway, as every
value check does (so does the check that every group has an on-policy row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..config import GroupStats
from ..reference import compute_dtype
from . import _launch
from ._launch import launch
from ._softmax import div_rn, sqrt_rn


@triton.jit
def _group_stats_kernel(
    order_ptr,  # (B,) int64 row ids sorted by group id (stable)
    run_start_ptr,  # (B + 1,) int64 first sorted position of group slot g; B for slots g >= G
    scores_ptr,  # (B,) rewards r in the compute dtype (fp32, or fp64 for fp64 scores)
    on_policy_ptr,  # (B,) 1.0 on on-policy rows, 0.0 on expert rows (compute dtype)
    passed_ptr,  # (B,) 1.0 where r > pass_threshold (compute dtype)
    eps_ptr,  # () eps of the std normalisation, in the compute dtype
    advantages_ptr,  # (B,) out: A per row
    weights_ptr,  # (B,) out: |A| per row
    group_index_ptr,  # (B,) int64 out: the group slot of each row
    mean_ptr,  # (B,) out per slot: on-policy mean (0 for a group with one on-policy row)
    std_ptr,  # (B,) out per slot: on-policy unbiased std (1 for a group with one on-policy row)
    pass_rate_ptr,  # (B,) out per slot: fraction of on-policy rows that pass
    count_ptr,  # (B,) int64 out per slot: number of on-policy rows
    NORM_BY_STD: tl.constexpr,  # A = (r - mean) / (std + eps) instead of r - mean
    BLOCK_ROWS: tl.constexpr,  # rows of a group per loop trip
):
    slot = tl.program_id(0).to(tl.int64)
    start = tl.load(run_start_ptr + slot)
    end = tl.load(run_start_ptr + slot + 1)
    dtype = scores_ptr.dtype.element_ty
    count = tl.zeros([BLOCK_ROWS], dtype)
    total = tl.zeros([BLOCK_ROWS], dtype)
    passing = tl.zeros([BLOCK_ROWS], dtype)
    for first in range(start, end, BLOCK_ROWS):
        pos = first + tl.arange(0, BLOCK_ROWS)
        inside = pos < end
        rows = tl.load(order_ptr + pos, mask=inside, other=0)
        on = tl.load(on_policy_ptr + rows, mask=inside, other=0.0)
        count += on
        # where, not * on: an expert row's score is not read (a NaN there must not poison the group)
        total += tl.where(on != 0, tl.load(scores_ptr + rows, mask=inside, other=0.0), 0.0)
        passing += tl.load(passed_ptr + rows, mask=inside, other=0.0) * on
    n = tl.sum(count, axis=0)
    denominator = tl.maximum(n, 1.0)
    raw_mean = div_rn(tl.sum(total, axis=0), denominator)
    squares = tl.zeros([BLOCK_ROWS], dtype)
    for first in range(start, end, BLOCK_ROWS):  # second pass: variance around the mean, as the reference
        pos = first + tl.arange(0, BLOCK_ROWS)
        inside = pos < end
        rows = tl.load(order_ptr + pos, mask=inside, other=0)
        on = tl.load(on_policy_ptr + rows, mask=inside, other=0.0)
        deviation = tl.where(on != 0, tl.load(scores_ptr + rows, mask=inside, other=0.0) - raw_mean, 0.0)
        squares += deviation * deviation
    raw_std = sqrt_rn(div_rn(tl.sum(squares, axis=0), tl.maximum(n - 1.0, 1.0)))
    single = n <= 1.0
    mean = tl.where(single, 0.0, raw_mean).to(dtype)
    std = tl.where(single, 1.0, raw_std).to(dtype)
    eps = tl.load(eps_ptr)
    for first in range(start, end, BLOCK_ROWS):
        pos = first + tl.arange(0, BLOCK_ROWS)
        inside = pos < end
        rows = tl.load(order_ptr + pos, mask=inside, other=0)
        advantage = tl.load(scores_ptr + rows, mask=inside, other=0.0) - mean
        if NORM_BY_STD:
            advantage = div_rn(advantage, std + eps)
        tl.store(advantages_ptr + rows, advantage, mask=inside)
        tl.store(weights_ptr + rows, tl.abs(advantage), mask=inside)
        tl.store(group_index_ptr + rows, tl.zeros([BLOCK_ROWS], tl.int64) + slot, mask=inside)
    tl.store(mean_ptr + slot, mean)
    tl.store(std_ptr + slot, std)
    tl.store(pass_rate_ptr + slot, div_rn(tl.sum(passing, axis=0), denominator).to(dtype))
    tl.store(count_ptr + slot, n.to(tl.int64))


def _group_count(run_index: torch.Tensor) -> int:
    """G from the device: the one host synchronisation of group_advantages (skipped with num_groups)."""
    return int(run_index[-1]) + 1


def group_advantages(
    scores, group_ids, is_expert, norm_by_std: bool, eps: float, pass_threshold: float, num_groups
) -> GroupStats:
    """The Triton twin of ``reference.group_advantages`` (same results up to the order of the sums: the
    divisions and the square root round as torch's, also on the GPU); ``num_groups`` (None or an int) avoids
    the sync. The kernel of the ``calibrl::group_advantages`` operator: every argument is given, validated by
    ``ops.group_advantages`` (whose defaults are the op's only ones)."""
    dt = compute_dtype(scores)
    device = scores.device
    B = scores.numel()
    r = scores.detach().to(dt).contiguous()  # (B,)
    on_policy = torch.ones(B, dtype=torch.bool, device=device) if is_expert is None else ~is_expert  # (B,)
    passed = r > pass_threshold  # (B,) as the reference: compared in the compute dtype
    # Remap arbitrary ids to 0..G-1 (ascending id) on the device.
    sorted_ids, order = torch.sort(group_ids, stable=True)  # (B,), (B,)
    new_run = torch.ones(B, dtype=torch.bool, device=device)
    new_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    run_index = torch.cumsum(new_run, 0) - 1  # (B,) group slot of each sorted position
    positions = torch.arange(B, device=device)
    run_start = torch.full((B + 1,), B, dtype=torch.int64, device=device)
    run_start.scatter_reduce_(0, run_index, positions, reduce="amin")  # (B + 1,)
    keys = torch.zeros_like(sorted_ids).scatter_(0, run_index, sorted_ids)  # (B,) equal values per run

    advantages = torch.empty(B, dtype=dt, device=device)
    weights = torch.empty_like(advantages)
    group_index = torch.empty(B, dtype=torch.int64, device=device)
    mean = torch.empty(B, dtype=dt, device=device)
    std = torch.empty_like(mean)
    pass_rate = torch.empty_like(mean)
    count = torch.empty(B, dtype=torch.int64, device=device)
    # eps in the compute dtype, made on the device by a fill (its value travels as a kernel argument):
    # torch.tensor(eps, device=...) would copy from host memory, which synchronises with the device. A
    # tensor rather than a scalar argument because triton passes Python floats as fp32, and fp64 scores
    # must see the same eps as the reference.
    eps_on_device = torch.full((), eps, dtype=dt, device=device)
    config = _launch.group_launch()
    launch(
        _group_stats_kernel,
        (B,),
        dict(
            order_ptr=order,
            run_start_ptr=run_start,
            scores_ptr=r,
            on_policy_ptr=on_policy.to(dt),
            passed_ptr=passed.to(dt),
            eps_ptr=eps_on_device,
            advantages_ptr=advantages,
            weights_ptr=weights,
            group_index_ptr=group_index,
            mean_ptr=mean,
            std_ptr=std,
            pass_rate_ptr=pass_rate,
            count_ptr=count,
            NORM_BY_STD=bool(norm_by_std),
        ),
        dict(BLOCK_ROWS=config.block_rows, num_warps=config.num_warps, num_stages=1),
        (),
        (),
        allow_autotune=False,  # a few microseconds of work: nothing to tune
    )

    if num_groups is None:
        G = _group_count(run_index)
    else:
        G = int(num_groups)
        if _checks.value_checks_enabled():
            _checks.check_num_groups(num_groups, _group_count(run_index))
    _checks.check_every_group_has_on_policy_rows(count[:G], keys[:G])
    return GroupStats(
        advantages=advantages,
        weights=weights,
        passed=passed,
        mean=mean[:G],
        std=std[:G],
        pass_rate=pass_rate[:G],
        count=count[:G],
        group_index=group_index,
        group_keys=keys[:G],
    )
