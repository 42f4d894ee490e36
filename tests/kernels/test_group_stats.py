"""Triton group_advantages (device remap of arbitrary group ids, no Python loop) against the reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import calibrl_kernels as ck
from calibrl_kernels import reference

pytest.importorskip("triton")
from calibrl_kernels.triton import group_stats as triton_group_stats  # noqa: E402  (after the triton check)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.usefixtures("force_triton"),
]


def _batch(sizes, device, dtype=torch.float32, seed=0, id_dtype=torch.int64, binary=True):
    """Groups of the given sizes (on-policy rows + one expert each), ids arbitrary, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([-7, 10**12, 3, 0, 42, -(10**9), 5, 99][: len(sizes)], dtype=torch.int64)
    group_ids = torch.cat([ids[i].repeat(n + 1) for i, n in enumerate(sizes)])
    is_expert = torch.cat([torch.tensor([False] * n + [True]) for n in sizes])
    if binary:
        scores = (torch.rand(group_ids.numel(), generator=g) > 0.5).to(dtype) + 0.1 * (
            torch.rand(group_ids.numel(), generator=g) > 0.3
        ).to(dtype)
    else:
        scores = torch.randn(group_ids.numel(), generator=g).to(dtype)
    perm = torch.randperm(group_ids.numel(), generator=g)
    return scores[perm].to(device), group_ids[perm].to(id_dtype).to(device), is_expert[perm].to(device)


def _assert_stats_equal(ours, ref, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for name in ("group_index", "group_keys", "count", "passed"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a.cpu(), b.cpu()), name
    for name in ("advantages", "weights", "mean", "std", "pass_rate"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=rtol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_by_std", [False, True])
@pytest.mark.parametrize("sizes", [[4, 1, 7], [35, 3], [10, 10, 10, 10, 10, 10, 10, 10]])
def test_matches_reference(sizes, norm_by_std, dtype, triton_device):
    scores, group_ids, is_expert = _batch(sizes, triton_device, dtype, seed=len(sizes))
    ours = ck.group_advantages(scores, group_ids, is_expert=is_expert, norm_by_std=norm_by_std)
    ref = reference.group_advantages(scores, group_ids, is_expert, norm_by_std)
    _assert_stats_equal(ours, ref, dtype)


def test_real_valued_scores_and_int32_ids(triton_device):
    scores, group_ids, is_expert = _batch([6, 2, 5], triton_device, seed=3, id_dtype=torch.int32, binary=False)
    ours = ck.group_advantages(scores, group_ids, is_expert=is_expert, norm_by_std=True, eps=1e-3, pass_threshold=0.0)
    ref = reference.group_advantages(scores, group_ids, is_expert, True, 1e-3, 0.0)
    _assert_stats_equal(ours, ref, torch.float32)


def test_without_expert_rows_and_single_row(triton_device):
    scores = torch.tensor([0.5], device=triton_device)
    ids = torch.tensor([9], device=triton_device)
    ours = ck.group_advantages(scores, ids)
    assert ours.mean.tolist() == [0.0] and ours.std.tolist() == [1.0] and ours.advantages.tolist() == [0.5]
    scores, group_ids, _ = _batch([3, 5], triton_device, seed=1)
    _assert_stats_equal(
        ck.group_advantages(scores, group_ids), reference.group_advantages(scores, group_ids), torch.float32
    )


def test_group_of_expert_rows_only_is_a_value_error(triton_device, monkeypatch):
    scores = torch.tensor([1.0, 0.0, 1.0], device=triton_device)
    ids = torch.tensor([1, 1, 2], device=triton_device)
    is_expert = torch.tensor([False, False, True], device=triton_device)
    with pytest.raises(
        ValueError, match="is_expert: expected every group to have at least one on-policy row.*group ids \\[2\\]"
    ):
        ck.group_advantages(scores, ids, is_expert=is_expert)
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "0")  # a value check: skippable in hot loops
    stats = ck.group_advantages(scores, ids, is_expert=is_expert)
    assert stats.count.tolist() == [2, 0]


def test_num_groups_avoids_the_group_count_sync(triton_device, monkeypatch):
    scores, group_ids, is_expert = _batch([4, 2, 3], triton_device, seed=2)
    ref = reference.group_advantages(scores, group_ids, is_expert)
    # with value checks on, a promised num_groups is verified
    _assert_stats_equal(ck.group_advantages(scores, group_ids, is_expert=is_expert, num_groups=3), ref, torch.float32)
    with pytest.raises(ValueError, match="num_groups: expected the number of distinct group_ids \\(3\\), got 2"):
        ck.group_advantages(scores, group_ids, is_expert=is_expert, num_groups=2)
    # without value checks, nothing reads G back from the device
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "0")

    def no_sync(run_index):
        raise AssertionError("group count read from the device although num_groups was given")

    monkeypatch.setattr(triton_group_stats, "_group_count", no_sync)
    _assert_stats_equal(ck.group_advantages(scores, group_ids, is_expert=is_expert, num_groups=3), ref, torch.float32)
    with pytest.raises(AssertionError, match="group count read"):
        ck.group_advantages(scores, group_ids, is_expert=is_expert)


# Operators that wait for the device: a read of a value on the host (item / bool / int), a tensor made
# from host data (torch.tensor(x, device=...) copies from pageable memory), data-dependent output sizes.
_HOST_SYNC_OPS = ("_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "unique", "item", "equal")


class _OperatorLog(TorchDispatchMode):
    """Every aten operator run inside the block (the Triton launch itself is not one)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_num_groups_and_no_value_checks_run_no_host_synchronising_operator(dtype, triton_device, monkeypatch):
    """The promise of num_groups: nothing waits for the device. Seen on any machine as the operators the op
    runs (on a GPU the next test also asks CUDA itself)."""
    scores, group_ids, is_expert = _batch([4, 2, 3], triton_device, dtype, seed=4)
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "0")
    with _OperatorLog() as log:
        stats = triton_group_stats.group_advantages(scores, group_ids, is_expert, True, 1e-3, 0.1, 3)
    synchronising = sorted({name for name in log.names if name.split("::")[-1].split(".")[0] in _HOST_SYNC_OPS})
    assert not synchronising, f"host-synchronising operators: {synchronising}"
    _assert_stats_equal(stats, reference.group_advantages(scores, group_ids, is_expert, True, eps=1e-3), dtype)


@pytest.mark.gpu
def test_num_groups_runs_without_cuda_synchronisation(monkeypatch):
    scores, group_ids, is_expert = _batch([4, 2, 3], "cuda", seed=5)
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "0")
    triton_group_stats.group_advantages(
        scores, group_ids, is_expert, True, 1e-6, 0.1, 3
    )  # compiled before timing anything
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = triton_group_stats.group_advantages(scores, group_ids, is_expert, True, 1e-6, 0.1, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_stats_equal(stats, reference.group_advantages(scores, group_ids, is_expert, True), torch.float32)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (99, ValueError), (2.0, TypeError), (True, TypeError)])
def test_num_groups_argument_is_validated(bad, error, triton_device):
    scores, group_ids, is_expert = _batch([2, 2], triton_device)
    with pytest.raises(error, match="num_groups"):
        ck.group_advantages(scores, group_ids, is_expert=is_expert, num_groups=bad)


def test_reference_checks_num_groups_too():
    scores, group_ids, is_expert = _batch([2, 2], "cpu")
    with pytest.raises(ValueError, match="num_groups"):
        reference.group_advantages(scores, group_ids, is_expert, num_groups=3)
