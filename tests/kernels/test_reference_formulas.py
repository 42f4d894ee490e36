"""The reference against an independent plain-Python transcription of docs/method.md (1e-10, float64),
gradcheck in float64, and property tests (hypothesis) of invariances."""

import itertools
import math

import _formulas as formulas
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, reference
from calibrl_kernels.config import ACTIVATIONS, LOSS_AGG_MODES, MODES

F64 = torch.float64


def random_batch(seed: int, B: int = 8, T: int = 6, groups: int = 2, with_expert: bool = True):
    """A hybrid batch: `groups` groups of (B // groups - 1) on-policy rows + 1 expert row each."""
    g = torch.Generator().manual_seed(seed)
    per = B // groups
    group_ids = torch.arange(groups).repeat_interleave(per)
    is_expert = torch.zeros(B, dtype=torch.bool)
    if with_expert:
        is_expert[per - 1 :: per] = True
    scores = torch.randint(0, 2, (B,), generator=g).to(F64) + 0.1 * torch.randint(0, 2, (B,), generator=g).to(F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0 if B > 4 else lengths[0]  # one empty on-policy row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    entropy = torch.rand(B, T, generator=g, dtype=F64) * 2
    return dict(scores=scores, group_ids=group_ids, is_expert=is_expert, old=old, logp=logp, mask=mask, entropy=entropy)


def to_lists(t):
    return [[float(v) for v in row] for row in t]


CONFIG_GRID = [
    dict(mode=mode, activation=act, loss_agg_mode=agg)
    for mode, act, agg in itertools.product(MODES, ACTIVATIONS, LOSS_AGG_MODES)
    if mode == "calibrl" or act == "leaky_relu"
] + [
    dict(weight_by_advantage=False),
    dict(mask_beyond_expert=True),
    dict(baseline="sequence-mean"),
    dict(baseline="sequence-mean", mask_beyond_expert=True, loss_agg_mode="seq-mean-token-mean"),
    dict(entropy_coef=0.03),
    dict(entropy_coef=0.03, mode="luffy"),
    dict(norm_by_std=True),
    dict(clip_low=0.1, clip_high=0.28, dual_clip_c=2.0, negative_slope=0.25, guide_coef=0.7),
    dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=37.0),
    dict(activation="huber", huber_delta=0.3),
]


@pytest.mark.parametrize("overrides", CONFIG_GRID, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_the_written_formulas(overrides, seed):
    cfg = CalibRLConfig(**overrides)
    batch = random_batch(seed)
    stats = ck.group_advantages(
        batch["scores"], batch["group_ids"], is_expert=batch["is_expert"], norm_by_std=cfg.norm_by_std
    )
    py_stats = formulas.group_stats(
        batch["scores"].tolist(), batch["group_ids"].tolist(), batch["is_expert"].tolist(), norm_by_std=cfg.norm_by_std
    )
    torch.testing.assert_close(stats.advantages, torch.tensor(py_stats["advantages"], dtype=F64), rtol=0, atol=1e-10)
    assert stats.passed.tolist() == py_stats["passed"]

    b, expert_tokens = ck.expert_baseline(
        batch["old"], batch["mask"], batch["group_ids"], batch["is_expert"], kind=cfg.baseline, return_mask=True
    )
    make_baseline = formulas.position_baseline if cfg.baseline == "position" else formulas.sequence_mean_baseline
    py_b = make_baseline(
        to_lists(batch["old"]), to_lists(batch["mask"]), batch["group_ids"].tolist(), batch["is_expert"].tolist()
    )
    torch.testing.assert_close(b, torch.tensor(py_b, dtype=F64), rtol=0, atol=1e-10)

    out = ck.calibrl_loss(
        batch["logp"],
        batch["old"],
        stats.advantages,
        batch["mask"],
        expert_logp=b,
        passed=stats.passed,
        is_expert=batch["is_expert"],
        entropy=batch["entropy"],
        expert_mask=expert_tokens,
        config=cfg,
    )
    expected = formulas.loss(
        to_lists(batch["logp"]),
        to_lists(batch["old"]),
        py_stats["advantages"],
        to_lists(batch["mask"]),
        cfg,
        b=py_b,
        passed=py_stats["passed"],
        is_expert=batch["is_expert"].tolist(),
        entropy=to_lists(batch["entropy"]),
        expert_mask=expert_tokens.tolist(),
    )
    for name, value in expected.items():
        assert math.isclose(float(getattr(out, name)), value, rel_tol=0, abs_tol=1e-10), (
            name,
            float(getattr(out, name)),
            value,
        )


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_logprobs_matches_the_written_formulas(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 9, generator=g, dtype=F64) * 3
    targets = torch.randint(0, 9, (5,), generator=g)
    targets[2] = -100
    logp, entropy = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    for i in range(5):
        if i == 2:
            assert logp[i] == 0 and entropy[i] == 0
            continue
        lp, h = formulas.token_logprob(logits[i].tolist(), int(targets[i]), temperature)
        assert math.isclose(float(logp[i]), lp, abs_tol=1e-12)
        assert math.isclose(float(entropy[i]), h, abs_tol=1e-12)


def test_token_logprobs_allows_minus_infinity_logits():
    logits = torch.tensor(
        [[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, float("-inf")]], dtype=F64, requires_grad=True
    )
    targets = torch.tensor([2, 1])
    logp, entropy = ck.token_logprobs(logits, targets, return_entropy=True)
    lp0, h0 = formulas.token_logprob([0.0, 1.0], 1)
    torch.testing.assert_close(logp, torch.tensor([lp0, 0.0], dtype=F64))
    torch.testing.assert_close(entropy, torch.tensor([h0, 0.0], dtype=F64))
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_shapes_and_dtypes_of_token_logprobs():
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 3))
    logp, entropy = ck.token_logprobs(logits, targets, return_entropy=True)
    assert logp.shape == (2, 3) and entropy.shape == (2, 3)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    flat = ck.token_logprobs(logits.reshape(6, 7), targets.reshape(6))
    torch.testing.assert_close(flat.reshape(2, 3), logp)


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_token_logprobs_both_outputs(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    targets = torch.tensor([0, 5, -100, 3])
    assert torch.autograd.gradcheck(
        lambda x: ck.token_logprobs(x, targets, temperature=temperature, return_entropy=True), (logits,)
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(activation="tanh"),
        dict(activation="sigmoid"),
        dict(activation="huber"),
        dict(mode="luffy", entropy_coef=0.1),
        dict(mode="grpo", loss_agg_mode="seq-mean-token-mean"),
        dict(baseline="sequence-mean", loss_agg_mode="seq-mean-token-sum-norm", entropy_coef=0.05),
    ],
    ids=str,
)
def test_gradcheck_calibrl_loss(overrides):
    # (rlplus is left out: its stop-gradient factor makes finite differences differ by design;
    # its gradient is checked by hand in test_reference_rules.py)
    cfg = CalibRLConfig(**overrides)
    batch = random_batch(11, B=6, T=3)
    stats = ck.group_advantages(batch["scores"], batch["group_ids"], is_expert=batch["is_expert"])
    b = ck.expert_baseline(batch["old"], batch["mask"], batch["group_ids"], batch["is_expert"], kind=cfg.baseline)
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)

    fields = dict(expert_logp=b, passed=stats.passed, is_expert=batch["is_expert"], config=cfg)

    def loss(lp, ent):
        return ck.calibrl_loss(lp, batch["old"], stats.advantages, batch["mask"], entropy=ent, **fields).loss

    assert torch.autograd.gradcheck(loss, (logp, entropy))


def test_fused_reference_gradient_matches_chain_rule_of_coefficients():
    """dL/dlogits = (a (p - onehot) + b p (z - lse + H)) / temperature with (a, b) = gradientcoefficients."""
    g = torch.Generator().manual_seed(5)
    B, T, V, temp = 4, 3, 7, 0.8
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    batch = random_batch(5, B=B, T=T)
    cfg = CalibRLConfig(temperature=temp, entropy_coef=0.2)
    stats = ck.group_advantages(batch["scores"], batch["group_ids"], is_expert=batch["is_expert"])
    b = ck.expert_baseline(batch["old"], batch["mask"], batch["group_ids"], batch["is_expert"])
    kwargs = dict(expert_logp=b, passed=stats.passed, is_expert=batch["is_expert"], config=cfg)
    out = ck.fused_calibrl_loss(logits, targets, batch["old"], stats.advantages, batch["mask"], **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logits)

    lp, ent = reference.token_logprobs(logits.detach(), targets, temp, return_entropy=True)
    _, a, bcoef = reference.gradient_coefficients(lp, ent, batch["old"], stats.advantages, batch["mask"], **kwargs)
    z = logits.detach() / temp
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(targets, V).to(F64)
    expected = (a[..., None] * (p - onehot) + bcoef[..., None] * p * (z - lse + ent[..., None])) / temp
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ property tests
small_shapes = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 9))


@settings(max_examples=25, deadline=None)
@given(shape=small_shapes, seed=st.integers(0, 10_000))
def test_permuting_rows_permutes_per_row_outputs(shape, seed):
    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    perm = torch.randperm(B, generator=g)
    lp, h = ck.token_logprobs(logits, targets, return_entropy=True)
    lp_p, h_p = ck.token_logprobs(logits[perm], targets[perm], return_entropy=True)
    torch.testing.assert_close(lp_p, lp[perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(h_p, h[perm], rtol=0, atol=1e-12)

    scores = torch.randint(0, 3, (B,), generator=g).to(F64) * 0.55
    group_ids = torch.randint(0, 3, (B,), generator=g) * 1000 - 7
    stats = ck.group_advantages(scores, group_ids, norm_by_std=True)
    stats_p = ck.group_advantages(scores[perm], group_ids[perm], norm_by_std=True)
    torch.testing.assert_close(stats_p.advantages, stats.advantages[perm], rtol=0, atol=1e-12)
    assert torch.equal(stats_p.passed, stats.passed[perm])

    old = lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    expert_logp = -torch.rand(B, T, generator=g, dtype=F64)
    for agg in ("token-mean", "seq-mean-token-mean"):
        cfg = CalibRLConfig(loss_agg_mode=agg)
        out = ck.calibrl_loss(
            lp, old, stats.advantages, mask, expert_logp=expert_logp, passed=stats.passed, entropy=h, config=cfg
        )
        out_p = ck.calibrl_loss(
            lp[perm],
            old[perm],
            stats.advantages[perm],
            mask[perm],
            expert_logp=expert_logp[perm],
            passed=stats.passed[perm],
            entropy=h[perm],
            config=cfg,
        )
        for a, b in zip(out, out_p):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(shape=small_shapes, seed=st.integers(0, 10_000), shift=st.floats(-50, 50))
def test_adding_a_constant_to_a_row_leaves_logprobs_unchanged(shape, seed, shift):
    N, _, V = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=F64)
    targets = torch.randint(0, V, (N,), generator=g)
    row_shift = torch.full((N, 1), shift, dtype=F64) * torch.rand(N, 1, generator=g, dtype=F64)
    lp, h = ck.token_logprobs(logits, targets, return_entropy=True)
    lp_s, h_s = ck.token_logprobs(logits + row_shift, targets, return_entropy=True)
    torch.testing.assert_close(lp_s, lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(h_s, h, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(shape=small_shapes, seed=st.integers(0, 10_000), temperature=st.floats(0.2, 5.0))
def test_temperature_equals_scaling_the_logits(shape, seed, temperature):
    N, _, V = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=F64) * 4
    targets = torch.randint(0, V, (N,), generator=g)
    lp, h = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    lp_1, h_1 = ck.token_logprobs(logits / temperature, targets, temperature=1.0, return_entropy=True)
    torch.testing.assert_close(lp, lp_1, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_1, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ public ops resolve batch fields
@pytest.mark.parametrize("linear", [False, True])
def test_fused_ops_resolve_scores_and_group_ids_like_explicit_fields(linear):
    g = torch.Generator().manual_seed(2)
    batch = random_batch(2, B=6, T=4)
    B, T, V, D = 6, 4, 11, 5
    targets = torch.randint(0, V, (B, T), generator=g)
    cfg = CalibRLConfig(norm_by_std=True)
    if linear:
        hidden = torch.randn(B, T, D, generator=g, dtype=F64)
        weight = torch.randn(V, D, generator=g, dtype=F64)
        call = lambda **kw: ck.fused_linear_calibrl_loss(
            hidden, weight, targets, batch["old"], mask=batch["mask"], config=cfg, **kw
        )
    else:
        logits = torch.randn(B, T, V, generator=g, dtype=F64)
        call = lambda **kw: ck.fused_calibrl_loss(logits, targets, batch["old"], mask=batch["mask"], config=cfg, **kw)
    implicit = call(advantages=None, scores=batch["scores"], group_ids=batch["group_ids"], is_expert=batch["is_expert"])
    stats = ck.group_advantages(batch["scores"], batch["group_ids"], is_expert=batch["is_expert"], norm_by_std=True)
    b = ck.expert_baseline(batch["old"], batch["mask"], batch["group_ids"], batch["is_expert"])
    explicit = call(advantages=stats.advantages, expert_logp=b, passed=stats.passed, is_expert=batch["is_expert"])
    for a, e in zip(implicit, explicit):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_fused_reference_leaves_ignored_targets_out():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 3, 5
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 1] = -100
    old = -torch.rand(B, T, generator=g, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    cfg = CalibRLConfig(mode="grpo")
    a = ck.fused_calibrl_loss(logits, targets, old, torch.tensor([1.0, -1.0], dtype=F64), mask, config=cfg)
    mask2 = mask.clone()
    mask2[0, 1] = False
    targets2 = targets.clone()
    targets2[0, 1] = 0
    b = ck.fused_calibrl_loss(logits, targets2, old, torch.tensor([1.0, -1.0], dtype=F64), mask2, config=cfg)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-12)
