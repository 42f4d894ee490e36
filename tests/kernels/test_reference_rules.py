"""Hand-computed cases for every rule of docs/method.md, checked on the reference in float64 to 1e-10."""

import math

import pytest
import torch

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, reference
from calibrl_kernels.reference import coefficients

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def t64(values):
    return torch.tensor(values, dtype=F64)


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), **TOL)


# ------------------------------------------------------------------ group statistics
def test_singleton_group_uses_mean_zero_std_one():
    scores = t64([0.7, 1.1, 0.0])
    gids = torch.tensor([3, 5, 5])
    is_expert = torch.tensor([False, False, True])  # group 5: one on-policy row + its expert
    stats = ck.group_advantages(scores, gids, is_expert=is_expert)
    close(stats.mean, [0.0, 0.0])
    close(stats.std, [1.0, 1.0])
    close(stats.advantages, [0.7, 1.1, 0.0])  # A = r - 0
    stats_std = ck.group_advantages(scores, gids, is_expert=is_expert, norm_by_std=True)
    close(stats_std.advantages, [0.7 / (1 + 1e-6), 1.1 / (1 + 1e-6), 0.0])
    assert stats.count.tolist() == [1, 1]


def test_expert_row_excluded_from_statistics_but_gets_an_advantage():
    scores = t64([1.1, 0.0, 0.1, 1.1])
    gids = torch.tensor([9, 9, 9, 9])
    is_expert = torch.tensor([False, False, False, True])
    stats = ck.group_advantages(scores, gids, is_expert=is_expert)
    mu = (1.1 + 0.0 + 0.1) / 3
    sigma = math.sqrt(((1.1 - mu) ** 2 + (0.0 - mu) ** 2 + (0.1 - mu) ** 2) / 2)  # unbiased
    close(stats.mean, [mu])
    close(stats.std, [sigma])
    close(stats.advantages, [1.1 - mu, -mu, 0.1 - mu, 1.1 - mu])  # expert: r - mu
    close(stats.weights, [abs(1.1 - mu), mu, abs(0.1 - mu), abs(1.1 - mu)])
    normed = ck.group_advantages(scores, gids, is_expert=is_expert, norm_by_std=True)
    close(normed.advantages, [(r - mu) / (sigma + 1e-6) for r in (1.1, 0.0, 0.1, 1.1)])


def test_pass_means_reward_above_one_tenth():
    scores = t64([1.1, 1.0, 0.1, 0.0, 0.10001])
    gids = torch.tensor([1, 1, 1, 1, 1])
    stats = ck.group_advantages(scores, gids)
    assert stats.passed.tolist() == [True, True, False, False, True]
    close(stats.pass_rate, [3 / 5])


def test_group_ids_may_be_arbitrary_and_unsorted():
    scores = t64([1.0, 0.0, 1.0, 1.0])
    gids = torch.tensor([10**12, -4, 10**12, -4])
    stats = ck.group_advantages(scores, gids)
    assert stats.group_keys.tolist() == [-4, 10**12]
    close(stats.mean, [0.5, 1.0])
    close(stats.advantages, [0.0, -0.5, 0.0, 0.5])


# ------------------------------------------------------------------ PPO term and metrics
def _ppo_batch():
    """Four one-token rows with known ratios: (A, rho) = (+1, 1.5), (-1, 5), (-1, 0.5), (+1, 5)."""
    adv = t64([1.0, -1.0, -1.0, 1.0])
    rho = [1.5, 5.0, 0.5, 5.0]
    logp = t64([[math.log(r)] for r in rho])
    old = torch.zeros(4, 1, dtype=F64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    return logp, old, adv, mask, rho


def test_dual_clip_applies_only_to_negative_advantages():
    logp, old, adv, mask, rho = _ppo_batch()
    l_pg, clipped, clipped_lower = reference.ppo_token_terms(logp, old, adv[:, None], CalibRLConfig(mode="grpo"))
    # (+1, 1.5): max(-1.5, -1.2) = -1.2            (-1, 5): max(5, 1.2) = 5, capped by 3 -> 3
    # (-1, 0.5): max(0.5, 0.8) = 0.8, min(0.8, 3)   (+1, 5): max(-5, -1.2) = -1.2, never capped at -3
    close(l_pg[:, 0], [-1.2, 3.0, 0.8, -1.2])
    assert clipped[:, 0].tolist() == [True, False, True, True]
    assert clipped_lower[:, 0].tolist() == [False, True, False, False]


def test_dual_clip_off_is_plain_ppo_clipping():
    logp, old, adv, mask, rho = _ppo_batch()
    config = CalibRLConfig(mode="grpo", dual_clip_c=None)
    l_pg, clipped, clipped_lower = reference.ppo_token_terms(logp, old, adv[:, None], config)
    close(l_pg[:, 0], [-1.2, 5.0, 0.8, -1.2])  # (-1, 5): max(5, 1.2) = 5, no cap
    assert not clipped_lower.any()
    # the closed-form slope of the kernels: d l / d lp = -A rho where the unclipped branch wins
    _, slope, _, _ = coefficients.ppo_term_and_slope(logp, old, adv[:, None], config)
    close(slope[:, 0], [0.0, 5.0, 0.0, 0.0])


def test_ppo_metrics_definitions():
    logp, old, adv, mask, rho = _ppo_batch()
    out = ck.calibrl_loss(logp, old, adv, mask, config=CalibRLConfig(mode="grpo"))
    close(out.pg_loss, (-1.2 + 3.0 + 0.8 - 1.2) / (4 + 1e-8))
    close(out.clipfrac, 3 / (4 + 1e-8))
    close(out.clipfrac_lower, 1 / (4 + 1e-8))
    close(out.ppo_kl, -sum(math.log(r) for r in rho) / (4 + 1e-8))
    close(out.guide_loss, 0.0)
    assert math.isnan(float(out.entropy))  # no entropy given


def test_ppo_metrics_include_expert_rows_but_the_loss_does_not():
    logp, old, adv, mask, rho = _ppo_batch()
    is_expert = torch.tensor([False, True, False, False])
    out = ck.calibrl_loss(logp, old, adv, mask, is_expert=is_expert, config=CalibRLConfig(mode="grpo"))
    close(out.pg_loss, (-1.2 + 0.8 - 1.2) / (3 + 1e-8))  # expert row dropped from the loss
    close(out.clipfrac_lower, 1 / (4 + 1e-8))  # ... but counted in the metrics (authors' code)


def test_log_ratio_is_clamped_at_twenty():
    logp = t64([[30.0]])
    old = t64([[0.0]])
    out = reference.ppo_token_terms(logp, old, t64([[-1.0]]), CalibRLConfig(mode="grpo"))[0]
    close(out, [[3.0]])  # exp(20) is capped by the dual clip, and nothing overflows
    out_pos = reference.ppo_token_terms(logp, old, t64([[1.0]]), CalibRLConfig(mode="grpo"))[0]
    close(out_pos, [[-1.2]])


# ------------------------------------------------------------------ expert rows and the guide term
def _calibrl_batch():
    # group 0: rows 0 (passed), 1 (failed), 2 (expert); T = 2
    logp = t64([[-0.2, -3.0], [-0.5, -4.0], [-0.1, -0.3]])
    old = logp.detach().clone()
    adv = t64([0.6, -0.4, 0.6])
    mask = torch.ones(3, 2, dtype=torch.bool)
    is_expert = torch.tensor([False, False, True])
    passed = torch.tensor([True, False, True])
    baseline = ck.expert_baseline(old, mask, torch.tensor([0, 0, 0]), is_expert)
    return logp, old, adv, mask, is_expert, passed, baseline


@pytest.mark.parametrize("mode", ["calibrl", "grpo", "dapo", "drgrpo"])
def test_expert_rows_contribute_nothing_to_either_term(mode):
    logp, old, adv, mask, is_expert, passed, baseline = _calibrl_batch()
    cfg = CalibRLConfig(mode=mode)
    logp = logp.requires_grad_(True)
    out = ck.calibrl_loss(logp, old, adv, mask, expert_logp=baseline, passed=passed, is_expert=is_expert, config=cfg)
    out.loss.backward()
    assert torch.all(logp.grad[2] == 0)
    moved = logp.detach().clone()
    moved[2] -= 1.7  # change the expert row's current log-probs: nothing may change
    again = ck.calibrl_loss(moved, old, adv, mask, expert_logp=baseline, passed=passed, is_expert=is_expert, config=cfg)
    close(again.loss, out.loss.detach())
    close(again.guide_loss, out.guide_loss)


def test_guide_gradient_is_minus_s_w_and_alpha_on_the_far_side():
    logp, old, adv, mask, is_expert, passed, baseline = _calibrl_batch()
    # baseline = expert's old logp at each position: [-0.1, -0.3]
    # row 0 (s=+1): z = -(lp - b) = [0.1-0.2... ] -> t0: -(-0.2+0.1)=0.1 > 0, t1: -(-3+0.3)=2.7 > 0
    # row 1 (s=-1): z = lp - b -> t0: -0.5+0.1 = -0.4 < 0, t1: -4+0.3 = -3.7 < 0
    alpha = 0.5
    grads = []
    for coef in (1.0, 0.0):
        lp = logp.detach().clone().requires_grad_(True)
        cfg = CalibRLConfig(guide_coef=coef, negative_slope=alpha)
        ck.calibrl_loss(
            lp, old, adv, mask, expert_logp=baseline, passed=passed, is_expert=is_expert, config=cfg
        ).loss.backward()
        grads.append(lp.grad)
    guide_grad = grads[0] - grads[1]  # d(agg(l_guide))/dlp, token-mean over 4 on-policy tokens
    c = 1.0 / (4 + 1e-8)
    expected = t64([[-1 * 0.6, -1 * 0.6], [+1 * 0.4 * alpha, +1 * 0.4 * alpha], [0.0, 0.0]]) * c
    close(guide_grad, expected)


def test_guide_gradient_full_strength_for_failed_row_above_baseline():
    # failed row above the baseline: z = lp - b > 0 -> gradient +|A| (push down at full strength)
    logp = t64([[-0.05], [-2.0]])
    old = logp.clone()
    adv = t64([-0.5, 0.5])
    mask = torch.ones(2, 1)
    is_expert = torch.tensor([False, True])
    baseline = t64([[-1.0], [-1.0]])
    lp = logp.clone().requires_grad_(True)
    cfg = CalibRLConfig(mode="calibrl", guide_coef=1.0)
    out = ck.calibrl_loss(
        lp, old, adv, mask, expert_logp=baseline, passed=torch.tensor([False, True]), is_expert=is_expert, config=cfg
    )
    out.loss.backward()
    ppo_grad = -(-0.5) * 1.0  # d(-A rho)/dlp at rho = 1 (unclipped)
    close(lp.grad[0, 0], (ppo_grad + 0.5) / (1 + 1e-8))
    close(out.guide_loss, 0.5 * 0.95 / (1 + 1e-8))


def test_weight_by_advantage_off_uses_unit_weight():
    logp, old, adv, mask, is_expert, passed, baseline = _calibrl_batch()
    fields = dict(expert_logp=baseline, passed=passed, is_expert=is_expert)
    on = ck.calibrl_loss(logp, old, adv, mask, **fields)
    off = ck.calibrl_loss(logp, old, adv, mask, config=CalibRLConfig(weight_by_advantage=False), **fields)
    z = [[0.1, 2.7], [-0.4, -3.7]]
    act = [[v if v > 0 else 0.5 * v for v in row] for row in z]
    close(on.guide_loss, (0.6 * (act[0][0] + act[0][1]) + 0.4 * (act[1][0] + act[1][1])) / (4 + 1e-8))
    close(off.guide_loss, sum(sum(r) for r in act) / (4 + 1e-8))


# ------------------------------------------------------------------ baselines
def test_position_baseline_is_zero_past_the_experts_length():
    old = t64([[-0.5, -0.7, -0.9], [-1.0, -2.0, -3.0], [-0.2, -0.4, -0.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    gids = torch.tensor([4, 4, 4])
    is_expert = torch.tensor([True, False, False])
    b, expert_tokens = ck.expert_baseline(old, mask, gids, is_expert, return_mask=True)
    close(b, [[-0.5, -0.7, 0.0]] * 3)
    assert expert_tokens.tolist() == [[True, True, False]] * 3
    mean_b = ck.expert_baseline(old, mask, gids, is_expert, kind="sequence-mean")
    close(mean_b, [[-0.6] * 3] * 3)


def test_mask_beyond_expert_drops_guide_terms_past_the_expert():
    old = t64([[-0.5, -0.7, -0.9], [-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    gids, is_expert = torch.tensor([4, 4]), torch.tensor([True, False])
    b, expert_tokens = ck.expert_baseline(old, mask, gids, is_expert, return_mask=True)
    adv, passed = t64([0.0, 1.0]), torch.tensor([True, True])
    fields = dict(expert_logp=b, passed=passed, is_expert=is_expert)
    keep = ck.calibrl_loss(old, old, adv, mask, **fields)
    config = CalibRLConfig(mask_beyond_expert=True)
    drop = ck.calibrl_loss(old, old, adv, mask, expert_mask=expert_tokens, config=config, **fields)
    # row 1 (passed, A = 1): z = -(lp - b) = [0.5, 1.3, 3.0 (b = 0 past the expert)]
    close(keep.guide_loss, (0.5 + 1.3 + 3.0) / (3 + 1e-8))
    close(drop.guide_loss, (0.5 + 1.3) / (2 + 1e-8))


def test_per_row_baseline_broadcasts_over_tokens():
    logp = t64([[-0.5, -1.5]])
    b_row = t64([-1.0])
    args = dict(passed=torch.tensor([True]))
    a = ck.calibrl_loss(logp, logp, t64([1.0]), torch.ones(1, 2), expert_logp=b_row, **args)
    b = ck.calibrl_loss(logp, logp, t64([1.0]), torch.ones(1, 2), expert_logp=t64([[-1.0, -1.0]]), **args)
    close(a.guide_loss, b.guide_loss)
    close(a.guide_loss, (0.5 * -0.5 + 0.5) / (2 + 1e-8))  # z = -0.5 (alpha side), +0.5


# ------------------------------------------------------------------ hybrid baselines
@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_expert_token_terms(mode):
    p, p_old, a = 0.5, 0.25, 0.6
    logp = t64([[math.log(p)], [math.log(0.9)]])
    old = t64([[math.log(p_old)], [math.log(0.9)]])
    adv = t64([a, -0.2])
    mask = torch.ones(2, 1)
    is_expert = torch.tensor([True, False])
    out = ck.calibrl_loss(logp, old, adv, mask, is_expert=is_expert, config=CalibRLConfig.for_algo(mode))
    expert_term = -a * p / (p + 0.1) if mode == "luffy" else -a * 2 * p / (1.5 * p_old + 0.5) * math.sqrt(1 - p)
    on_policy_term = 0.2  # A = -0.2, rho = 1 -> -A * 1
    close(out.pg_loss, (expert_term + on_policy_term) / (2 + 1e-8))  # expert rows count in the aggregation


def test_rlplus_focal_factor_is_stop_gradient():
    p, p_old, a = 0.5, 0.25, 0.6
    lp = t64([[math.log(p)]]).requires_grad_(True)
    old = t64([[math.log(p_old)]])
    out = ck.calibrl_loss(
        lp, old, t64([a]), torch.ones(1, 1), is_expert=torch.tensor([True]), config=CalibRLConfig.for_algo("rlplus")
    )
    out.loss.backward()
    # d/dlp of -A 2p/(1.5 p_old + 0.5) * sg((1-p)^0.5) = -A 2p/(...) * (1-p)^0.5 (dp/dlp = p)
    close(lp.grad[0, 0], -a * 2 * p / (1.5 * p_old + 0.5) * math.sqrt(1 - p) / (1 + 1e-8))


# ------------------------------------------------------------------ aggregation
def test_each_aggregation_mode():
    loss_mat = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # third row empty
    close(reference.aggregate(loss_mat, mask, "token-mean"), 7.0 / (3 + 1e-8))
    close(reference.aggregate(loss_mat, mask, "seq-mean-token-mean"), (3.0 / (2 + 1e-8) + 4.0 / (1 + 1e-8)) / 2)
    close(reference.aggregate(loss_mat, mask, "seq-mean-token-sum"), 3.5)
    close(reference.aggregate(loss_mat, mask, "seq-mean-token-sum-norm"), 3.5 / 3)
    close(reference.aggregate(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=100.0), 0.035)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        weights = reference.aggregation_weights(mask, mode, dtype=F64)
        close((weights * loss_mat).sum(), reference.aggregate(loss_mat, mask, mode))


def test_everything_masked_gives_zero_loss_and_zero_gradient():
    logp = torch.randn(3, 4, dtype=F64).requires_grad_(True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = ck.calibrl_loss(
            logp,
            logp.detach(),
            t64([1.0, -1.0, 0.5]),
            mask,
            expert_logp=torch.zeros(3, 4, dtype=F64),
            passed=torch.tensor([True, False, True]),
            config=CalibRLConfig(loss_agg_mode=mode),
        )
        (grad,) = torch.autograd.grad(out.loss, logp)
        close(out.loss.detach(), 0.0)
        assert torch.all(grad == 0)


def test_entropy_bonus_and_metric():
    logp = t64([[-1.0, -2.0], [-1.0, -1.0]])
    entropy = t64([[2.0, 4.0], [1.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    is_expert = torch.tensor([False, True])
    cfg = CalibRLConfig(mode="grpo", entropy_coef=0.01)
    out = ck.calibrl_loss(logp, logp, t64([0.0, 0.0]), mask, is_expert=is_expert, entropy=entropy, config=cfg)
    close(out.entropy, 6.0 / (2 + 1e-8))  # on-policy tokens only
    close(out.loss, -0.01 * 6.0 / (2 + 1e-8))  # A = 0: only the entropy bonus remains
