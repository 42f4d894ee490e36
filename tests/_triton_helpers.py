"""Shared helpers of the Triton test files (error bounds against the fp64 reference)."""

from __future__ import annotations

import torch

# The fields of LossOutput, in order (every loss op returns them).
LOSS_FIELDS = ("loss", "pg_loss", "guide_loss", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl")


def cast_floating(t: torch.Tensor, dtype) -> torch.Tensor:
    """t in dtype if it is a floating tensor and dtype is given (integer / bool tensors unchanged)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference, NaN-aware (matching NaN/inf count as 0)."""
    value = value.detach().double()
    truth = truth.detach().double()
    same = (value == truth) | (torch.isnan(value) & torch.isnan(truth))
    diff = torch.where(same, torch.zeros_like(value), (value - truth).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_rel(value: torch.Tensor, truth: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """|value - truth| <= rtol * (|truth| + max|truth| * 1e-2): relative, with a floor at 1% of the scale.

    The floor keeps near-zero entries (e.g. gradients of tokens with p ~ 0) from demanding an absolute
    accuracy far below the fp32 rounding of the larger entries they are computed with.
    """
    value = value.detach().double()
    truth = truth.detach().double()
    assert value.shape == truth.shape, f"{name}: shape {tuple(value.shape)} != {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(value), finite), f"{name}: non-finite entries differ"
    assert torch.equal(value[~finite], truth[~finite]) or torch.isnan(truth[~finite]).all(), (
        f"{name}: inf entries differ"
    )
    if not finite.any():
        return
    v, t = value[finite], truth[finite]
    scale = float(t.abs().max())
    bound = rtol * (t.abs() + 1e-2 * scale + 1e-30)
    worst = float(((v - t).abs() / bound).max())
    assert worst <= 1.0, f"{name}: error {float((v - t).abs().max()):.3e} exceeds rtol={rtol} (worst ratio {worst:.2f})"


def assert_no_worse_than_reference(
    value, reference_value, truth, factor: float = 2.0, slack: float = 1e-6, name: str = ""
):
    """Low-precision check against the fp64 truth: error(value) <= factor * error(reference_value) + slack * scale,
    scale = max(|truth|, 1) (so that exact agreement of both with a rounded truth does not demand 0 error)."""
    scale = float(truth.detach().double().abs().max()) if truth.numel() else 0.0
    ours = max_error(value, truth)
    theirs = max_error(reference_value, truth)
    assert ours <= factor * theirs + slack * max(scale, 1.0), (
        f"{name}: error {ours:.3e} vs fp64 exceeds {factor} x the reference's {theirs:.3e} "
        f"+ {slack * max(scale, 1.0):.1e}"
    )
