"""Shared builders for the CPU-path tests (coefficients, chunked linear path, C++ backend, modules)."""

from __future__ import annotations

import itertools
import os
from typing import Dict, NamedTuple, Optional

import torch
from _configs import CONFIG_MATRIX, CPU_CASES

from calibrl_kernels import reference
from calibrl_kernels.config import DEFAULT_CONFIG, CalibRLConfig, LossInputs

CONFIGS: Dict[str, CalibRLConfig] = {name: CONFIG_MATRIX[name] for name in CPU_CASES}


class Batch(NamedTuple):
    """An RL batch of B rows x T tokens in groups of rows_per_group on-policy rows + 1 expert row."""

    old_logp: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) float 0/1
    expert_logp: torch.Tensor  # (B, T) or (B,)
    expert_mask: torch.Tensor  # (B, T) bool
    passed: torch.Tensor  # (B,) bool
    is_expert: torch.Tensor  # (B,) bool

    def fields(self) -> dict:
        """The optional loss fields of this batch as keyword arguments (those of the loss modules' forward)."""
        return dict(
            expert_logp=self.expert_logp, passed=self.passed, is_expert=self.is_expert, expert_mask=self.expert_mask
        )

    def kwargs(self, config: CalibRLConfig) -> dict:
        """Keyword arguments of the loss ops for this batch."""
        return dict(self.fields(), config=config)

    def inputs(self, ignore_index: int = -100, mask: Optional[torch.Tensor] = None) -> LossInputs:
        """This batch as the LossInputs a backend takes (mask: another (B, T) mask instead of its own)."""
        return LossInputs(
            self.old_logp,
            self.advantages,
            self.mask if mask is None else mask,
            self.expert_logp,
            self.passed,
            self.is_expert,
            self.expert_mask,
            ignore_index,
        )


def make_batch(
    groups: int,
    rows_per_group: int,
    T: int,
    *,
    config: CalibRLConfig,
    dtype=torch.float64,
    seed: int = 0,
    all_masked: bool = False,
) -> Batch:
    """A batch with one expert row per group, partially masked rows, a fully masked row, mixed pass flags."""
    g = torch.Generator().manual_seed(seed)
    B = groups * (rows_per_group + 1)
    group_ids = torch.arange(groups).repeat_interleave(rows_per_group + 1)
    is_expert = torch.zeros(B, dtype=torch.bool)
    is_expert[rows_per_group :: rows_per_group + 1] = True
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
    return Batch(
        old_logp, stats.advantages.to(dtype), mask, expert_logp.to(dtype), expert_mask, stats.passed, is_expert
    )


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


def batch_with_ties(batch: Batch, logp: torch.Tensor) -> Batch:
    """The batch with old_logp / a per-token expert baseline moved so that the given logp (B, T) (e.g.
    a kernel's) hits the ties of token_values_with_ties: lp == old_lp, lp == baseline, lp - baseline
    == +-1, lp - old_lp == +-20, far-out ratios."""
    old = batch.old_logp.clone()
    baseline = batch.expert_logp.clone()
    per_token = baseline.dim() == 2  # a (B,) baseline cannot tie per token
    logp = logp.to(old.dtype)
    pattern = itertools.cycle(range(8))
    B, T = old.shape
    for row in range(B):
        for t in range(T):
            kind, sign = next(pattern), (1.0 if t % 2 else -1.0)
            if kind == 0:
                old[row, t] = logp[row, t]
            elif kind == 1 and per_token:
                baseline[row, t] = logp[row, t]
            elif kind == 2 and per_token:
                baseline[row, t] = logp[row, t] - sign
            elif kind == 3:
                old[row, t] = logp[row, t] - 20.0 * sign
            elif kind == 4:
                old[row, t] = logp[row, t] - 2.5 * sign
    return batch._replace(old_logp=old, expert_logp=baseline)


def assert_loss_outputs_close(actual, expected, rtol, atol, what=""):
    """Every LossOutput field close (nan == nan)."""
    for name in expected._fields:
        a, e = getattr(actual, name), getattr(expected, name)
        torch.testing.assert_close(
            a.to(torch.float64),
            e.to(torch.float64),
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            msg=lambda m, name=name: f"{what} LossOutput.{name}: {m}",
        )


# --------------------------------------------------------------------------------------------
# Linear (lm_head) cases and comparison helpers
# --------------------------------------------------------------------------------------------
class LinearCase(NamedTuple):
    hidden: torch.Tensor  # (B, T, D) leaf requiring grad
    weight: torch.Tensor  # (V, D) leaf requiring grad
    bias: object  # (V,) leaf requiring grad, or None
    targets: torch.Tensor  # (B, T) int64 with some ignore_index entries
    batch: Batch

    def leaves(self):
        return tuple(t for t in (self.hidden, self.weight, self.bias) if t is not None)

    def loss_args(self) -> tuple:
        """Positional arguments of the fused linear loss ops: hidden, weight, targets, old_logp, advantages, mask."""
        b = self.batch
        return (self.hidden, self.weight, self.targets, b.old_logp, b.advantages, b.mask)


def make_linear_case(
    config: CalibRLConfig,
    *,
    groups=2,
    rows_per_group=2,
    T=5,
    D=9,
    V=67,
    dtype=torch.float64,
    bias=True,
    seed=0,
    ignore_index=-100,
    all_masked=False,
) -> LinearCase:
    g = torch.Generator().manual_seed(seed + 100)
    batch = make_batch(groups, rows_per_group, T, config=config, dtype=torch.float64, seed=seed, all_masked=all_masked)
    B = batch.old_logp.shape[0]
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = ignore_index
    if T > 2:
        targets[-1, 2] = ignore_index
    return LinearCase(hidden, weight, b, targets, batch)


def upcast_leaves(case: LinearCase) -> LinearCase:
    """The same case with fp64 copies of hidden / weight / bias (the exact reference's inputs)."""
    up = lambda t: None if t is None else t.detach().to(torch.float64).requires_grad_(True)  # noqa: E731
    return case._replace(hidden=up(case.hidden), weight=up(case.weight), bias=up(case.bias))


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in fp64; 0 / 0 counts as 0)."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    return err / scale if scale > 0 else err


def chunked_linear_loss(
    hidden,
    weight,
    targets,
    old_logp,
    advantages,
    mask,
    *,
    bias=None,
    expert_logp=None,
    passed=None,
    is_expert=None,
    expert_mask=None,
    ignore_index=-100,
    config=DEFAULT_CONFIG,
    **extra,
):
    """The chunked path of ``fused_linear_calibrl_loss`` (the backend entry, taking LossInputs) called like the
    reference's twin; extra: row_math (its name picks the backend, default the torch row math), chunk_bytes."""
    from calibrl_kernels import chunked, library

    inputs = LossInputs(old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, ignore_index)
    impl = extra.pop("row_math", chunked.TORCH_ROW_MATH).name
    return library.fused_linear_calibrl_loss(impl)(hidden, weight, targets, inputs, config, bias, **extra)


def loss_and_grads(fn, case: LinearCase, config: CalibRLConfig, ignore_index=-100, scale=1.0, **extra):
    """Run a fused linear loss fn(hidden, weight, targets, ...) and backpropagate scale * loss."""
    b = case.batch
    out = fn(*case.loss_args(), bias=case.bias, ignore_index=ignore_index, **b.kwargs(config), **extra)
    grads = torch.autograd.grad(out.loss * scale, case.leaves())
    return out, grads


def running_in_ci() -> bool:
    """Whether env CI says this is a CI run (GitHub Actions, GitLab CI, ... set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def cpp_module_or_skip():
    """The built C++ extension; without it a skip naming why, or a failure in CI (env CI set), where a
    missing compiler is a broken CI and must not silently skip every C++ test."""
    import pytest

    from calibrl_kernels.cpu import build

    module = build.extension(fallback_warning=False)
    if module is None:
        reason = f"the C++ extension cannot be built here: {build.build_error()}"
        if running_in_ci():
            pytest.fail(f"{reason} (CI is set: the C++ tests must run in CI; install a C++ compiler and ninja)")
        pytest.skip(reason)
    return module


def simulate_build_failure(monkeypatch, message: str = "simulated: no C++ compiler") -> None:
    """Forget this process's C++ build and make the next attempt fail (monkeypatch restores it all)."""
    from calibrl_kernels.cpu import build

    def fail(verbose=False):
        raise RuntimeError(message)

    monkeypatch.setattr(build, "_module", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setattr(build, "_warned", False, raising=False)
    monkeypatch.setattr(build, "_compile_and_load", fail)
