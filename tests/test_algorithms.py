"""The algorithm registry: presets, group statistics, expert mixing and the fused loss wiring."""

import pytest
import torch

import calibrl_kernels as ck
from calibrl import algorithms
from calibrl.config import ALGOS
from calibrl_kernels.config import ALGORITHM_PRESETS, MODES, LossInputs


def test_registry_covers_every_algo():
    assert set(algorithms.REGISTRY) == set(ALGOS)
    assert algorithms.make_algorithm("calibrl").loss.uses_guide
    assert not algorithms.make_algorithm("grpo").loss.uses_guide
    assert algorithms.make_algorithm("sft+grpo").long_sft and algorithms.make_algorithm("sft+grpo").loss.mode == "grpo"
    assert algorithms.make_algorithm("luffy").loss.keeps_expert_rows
    assert algorithms.make_algorithm("calibrl", {"guide_coef": 0.3}).loss.guide_coef == 0.3
    with pytest.raises(ValueError, match="algo"):
        algorithms.make_algorithm("ppo")


def test_every_algorithm_table_derives_from_the_presets():
    # The trainer's --algo choices and registry, the loss modes and the for_algo presets are one table.
    assert ALGOS == tuple(ALGORITHM_PRESETS) == tuple(algorithms.REGISTRY)
    assert MODES == ("calibrl", "grpo", "dapo", "drgrpo", "luffy", "rlplus")
    for name, preset in ALGORITHM_PRESETS.items():
        config = ck.CalibRLConfig.for_algo(name)
        assert (config.mode, config.norm_by_std, config.loss_agg_mode) == preset[:3], name
        assert algorithms.make_algorithm(name).summary == preset.summary
    with pytest.raises(ValueError, match=r"for_algo: algo expected one of \('calibrl', .*'sft\+grpo'\)"):
        ck.CalibRLConfig.for_algo("ppo")


def _batch(seed=0, groups=3, n=3, T=5, D=8, V=11):
    g = torch.Generator().manual_seed(seed)
    B = groups * (n + 1)
    is_expert = torch.tensor(([False] * n + [True]) * groups)
    group_ids = torch.arange(groups).repeat_interleave(n + 1) + 100
    rewards = torch.tensor([1.1, 0.1, 0.0, 1.1, 1.1, 1.1, 0.0, 1.1, 0.1, 1.0, 0.0, 1.1])[:B]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    targets = torch.randint(0, V, (B, T), generator=g).masked_fill(mask == 0, -100)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    return dict(
        is_expert=is_expert,
        group_ids=group_ids,
        rewards=rewards,
        mask=mask,
        targets=targets,
        hidden=hidden,
        weight=weight,
    )


@pytest.mark.parametrize("algo", ALGOS)
def test_policy_loss_equals_the_reference_on_explicit_logits(algo):
    b = _batch()
    loss_cfg = algorithms.make_algorithm(algo).loss
    stats = algorithms.group_statistics(b["rewards"], b["group_ids"], b["is_expert"], loss_cfg)
    logits = b["hidden"] @ b["weight"].T
    old = ck.token_logprobs(logits + 0.05 * torch.randn_like(logits), b["targets"], ignore_index=-100)  # (B, T)
    baseline, baseline_mask = algorithms.expert_baseline(old, b["mask"], b["group_ids"], b["is_expert"], loss_cfg)
    hidden = b["hidden"].clone().requires_grad_(True)
    out = algorithms.policy_loss(
        hidden,
        b["weight"],
        None,
        b["targets"],
        LossInputs(old, stats.advantages, b["mask"], baseline, stats.passed, b["is_expert"], baseline_mask),
        loss_cfg,
    )
    logp, entropy = ck.token_logprobs(b["hidden"] @ b["weight"].T, b["targets"], ignore_index=-100, return_entropy=True)
    expected = ck.calibrl_loss(
        logp,
        old,
        stats.advantages,
        b["mask"],
        expert_logp=baseline if loss_cfg.uses_guide else None,
        passed=stats.passed,
        is_expert=b["is_expert"],
        entropy=entropy,
        config=loss_cfg,
    )
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.metrics() == pytest.approx(expected.metrics())
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_group_statistics_exclude_the_expert_row():
    b = _batch()
    stats = algorithms.group_statistics(
        b["rewards"], b["group_ids"], b["is_expert"], algorithms.make_algorithm("calibrl").loss
    )
    # on-policy rewards per group: (1.1, 0.1, 0.0), (1.1, 1.1, 0.0), (0.1, 1.0, 0.0); experts all 1.1
    assert stats.mean.tolist() == pytest.approx([1.2 / 3, 2.2 / 3, 1.1 / 3])
    assert stats.pass_rate.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    assert stats.count.tolist() == [3, 3, 3]
    assert stats.advantages[3].item() == pytest.approx(1.1 - stats.mean[0].item())  # expert row gets an advantage too


def test_expert_keep_mask():
    is_expert = torch.tensor([False, True, False, True, False, True])
    group_index = torch.tensor([0, 0, 1, 1, 2, 2])
    pass_rate = torch.tensor([0.0, 0.5, 1.0])
    keep_all = algorithms.expert_keep_mask(group_index, is_expert, pass_rate, "always", 1.0, 0, 1)
    assert keep_all.all()
    torch.manual_seed(0)
    none = algorithms.expert_keep_mask(group_index, is_expert, pass_rate, "always", 0.0, 0, 1)
    assert none.tolist() == [True, False, True, False, True, False]
    by_pass = algorithms.expert_keep_mask(group_index, is_expert, pass_rate, "pass", 1.0, 0.0, 0.5)
    assert by_pass.tolist() == [True, True, True, True, True, False]


def test_sft_loss_is_token_mean_nll():
    b = _batch()
    loss, tokens = algorithms.sft_loss(b["hidden"], b["weight"], None, b["targets"])
    logp = ck.token_logprobs(b["hidden"] @ b["weight"].T, b["targets"], ignore_index=-100)
    assert tokens.item() == int(b["mask"].sum())
    torch.testing.assert_close(loss, -logp.sum() / b["mask"].sum())
