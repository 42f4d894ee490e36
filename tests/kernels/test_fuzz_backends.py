"""Property tests: every backend agrees with the torch reference over random small problems.

Backends compared with the fp64 reference (``reference.fused_calibrl_loss`` /
``reference.fused_linear_calibrl_loss`` on float64 copies of the same inputs):
  fused_calibrl_loss:        cpp (C++ kernels), triton (interpreter on CPU, natively on CUDA)
  fused_linear_calibrl_loss: torch (the chunked linear path with torch row math), cpp (chunked, C++ row
                             math), triton; the chunked paths run with a budget of a few rows per chunk.
Drawn: B, T in 1..4, V in 2..9, D in 1..5; fp32 (tight tolerance) or bf16 (loose); masks (random,
all ones, all masked, ignore_index targets); group layouts (groups of one, one zero-variance group,
all-expert rows, groups with an expert row); configs (mode, activation, baseline, loss_agg_mode,
temperature, entropy_coef, norm_by_std). Checked: loss and metrics, and the gradients.

Derandomized (the same examples on every run, reproducible in CI). To explore new examples run e.g.
``python -m pytest tests/kernels/test_fuzz_backends.py -p no:cacheprovider --hypothesis-seed=1234`` after
removing ``derandomize=True`` below (or set it with a hypothesis profile); a failure prints a
``@reproduce_failure`` blob (print_blob=True).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from _triton_helpers import LOSS_FIELDS  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import calibrl_kernels as ck  # noqa: E402
from calibrl_kernels import CalibRLConfig, chunked, reference  # noqa: E402
from calibrl_kernels.config import ACTIVATIONS, BASELINES, LOSS_AGG_MODES, MODES  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# Examples per test (README "Reliability" quotes the total: FUSED_EXAMPLES + LINEAR_EXAMPLES).
FUSED_EXAMPLES = 40
LINEAR_EXAMPLES = 30
LAYOUTS = ("groups-of-one", "zero-variance", "all-expert", "expert-per-group")
MASKS = ("random", "all-ones", "all-masked", "ignore-index")
SETTINGS = dict(
    deadline=None,
    print_blob=True,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def forced_backend(name):
    """CALIBRL_IMPL=name inside the block (hypothesis re-runs the body, so no monkeypatch fixture)."""
    old = os.environ.get("CALIBRL_IMPL")
    os.environ["CALIBRL_IMPL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CALIBRL_IMPL", None)
        else:
            os.environ["CALIBRL_IMPL"] = old


@st.composite
def problems(draw, linear: bool):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    V = draw(st.integers(2, 9))
    D = draw(st.integers(1, 5)) if linear else 0
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    mode = draw(st.sampled_from(MODES))
    config = CalibRLConfig(
        mode=mode,
        activation=draw(st.sampled_from(ACTIVATIONS)),
        baseline=draw(st.sampled_from(BASELINES)),
        loss_agg_mode=draw(st.sampled_from(LOSS_AGG_MODES)),
        temperature=draw(st.sampled_from([0.5, 1.0, 1.7])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        norm_by_std=draw(st.booleans()),
        weight_by_advantage=draw(st.booleans()),
    )
    layout = draw(st.sampled_from(LAYOUTS))
    mask_kind = draw(st.sampled_from(MASKS))
    seed = draw(st.integers(0, 2**16))
    return B, T, V, D, dtype, config, layout, mask_kind, seed


def make_batch(B, T, V, D, dtype, config, layout, mask_kind, seed):
    """Inputs (leaf tensors in dtype) and the RL fields (fp32) of one drawn problem."""
    g = torch.Generator().manual_seed(seed)
    if D:
        leaves = {
            "hidden": (torch.randn(B, T, D, generator=g)).to(dtype),
            "weight": (torch.randn(V, D, generator=g) / D**0.5 * 2).to(dtype),
        }
    else:
        leaves = {"logits": (torch.randn(B, T, V, generator=g) * 2).to(dtype)}
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    if mask_kind == "all-ones":
        mask = torch.ones(B, T)
    elif mask_kind == "all-masked":
        mask = torch.zeros(B, T)
    elif mask_kind == "ignore-index":
        targets = torch.where(torch.rand(B, T, generator=g) > 0.5, targets, torch.full_like(targets, -100))
    scores = torch.rand(B, generator=g)
    if layout == "groups-of-one":
        group_ids, is_expert = torch.arange(B), torch.zeros(B, dtype=torch.bool)
    elif layout == "zero-variance":
        group_ids, is_expert, scores = (
            torch.zeros(B, dtype=torch.long),
            torch.zeros(B, dtype=torch.bool),
            torch.full((B,), 0.5),
        )
    elif layout == "all-expert":
        group_ids, is_expert = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool)
    else:
        group_ids, is_expert = torch.arange(B) // 3, torch.arange(B) % 3 == 2
    if layout == "all-expert":  # no on-policy row: no group statistics; advantages given directly
        advantages, passed = torch.randn(B, generator=g), scores > config.pass_threshold
    else:
        stats = reference.group_advantages(
            scores, group_ids, is_expert, config.norm_by_std, config.adv_eps, config.pass_threshold
        )
        advantages, passed = stats.advantages, stats.passed
    old_logp = -torch.rand(B, T, generator=g) * 3
    expert_shape = (B,) if config.baseline == "sequence-mean" else (B, T)
    fields = dict(
        old_logp=old_logp,
        advantages=advantages.float(),
        mask=mask,
        expert_logp=-torch.rand(expert_shape, generator=g) * 3,
        passed=passed,
        is_expert=is_expert,
    )
    return leaves, targets, fields


def run(op, leaves, targets, fields, config, dtype=None):
    """The op on fresh leaf copies (cast to dtype if given) -> (LossOutput, gradients by leaf name)."""
    leaves = {
        k: (v.detach().to(dtype) if dtype else v.detach().clone()).requires_grad_(True) for k, v in leaves.items()
    }
    f = {k: (v.to(dtype) if dtype and v.is_floating_point() and k != "mask" else v) for k, v in fields.items()}
    args = [leaves[k] for k in (("hidden", "weight") if "hidden" in leaves else ("logits",))]
    out = op(
        *args,
        targets,
        f["old_logp"],
        f["advantages"],
        f["mask"],
        expert_logp=f["expert_logp"],
        passed=f["passed"],
        is_expert=f["is_expert"],
        config=config,
    )
    out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


def check_against_truth(name, out, grads, truth, truth_grads, low_precision):
    rtol, atol = (3e-2, 3e-2) if low_precision else (2e-4, 2e-5)
    for field in LOSS_FIELDS:
        value, want = getattr(out, field).detach().double(), getattr(truth, field).detach().double()
        if torch.isnan(want):
            assert torch.isnan(value), f"{name}.{field}: {float(value)} where the reference gives nan"
            continue
        assert abs(float(value - want)) <= atol + rtol * abs(float(want)), (
            f"{name}.{field}: {float(value)} vs {float(want)}"
        )
    for key, want in truth_grads.items():
        got = grads[key]
        assert got is not None and got.shape == want.shape, f"{name}: d{key} missing or mis-shaped"
        scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-3)
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= atol * scale + rtol * scale, f"{name}: d{key} error {err:.3e} at scale {scale:.3e}"


def check_backends(problem, op, reference_op, backends, chunk_scope=contextlib.nullcontext):
    """``op`` on each of ``backends`` against ``reference_op`` in fp64, on the batch of ``problem``;
    ``chunk_scope(V)`` is entered around each backend's run."""
    B, T, V, D, dtype, config, layout, mask_kind, seed = problem
    leaves, targets, fields = make_batch(*problem)
    truth, truth_grads = run(reference_op, leaves, targets, fields, config, dtype=torch.float64)
    for backend in backends:
        with forced_backend(backend), chunk_scope(V):
            out, grads = run(op, leaves, targets, fields, config)
        check_against_truth(
            f"{backend}[{layout},{mask_kind},{dtype}]", out, grads, truth, truth_grads, dtype == torch.bfloat16
        )


@settings(max_examples=FUSED_EXAMPLES, **SETTINGS)
@given(problems(linear=False))
def test_fused_backends_match_the_reference(problem):
    check_backends(problem, ck.fused_calibrl_loss, reference.fused_calibrl_loss, ("cpp", "triton"))


def _two_rows_per_chunk(V):
    """A chunk budget of about two rows, so the chunked CPU paths loop over several chunks."""
    return chunked.chunk_bytes_scope(2 * V * 8 * 8)


@settings(max_examples=LINEAR_EXAMPLES, **SETTINGS)
@given(problems(linear=True))
def test_linear_backends_match_the_reference(problem):
    check_backends(
        problem,
        ck.fused_linear_calibrl_loss,
        reference.fused_linear_calibrl_loss,
        ("torch", "cpp", "triton"),
        _two_rows_per_chunk,
    )
