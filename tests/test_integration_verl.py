"""The CalibRL loss and advantage estimator registered in verl 0.9's registries, and the pieces that carry
expert rows to the actor.

verl 0.9.1 pins transformers <5.11, so these tests run in their own environment: `bash .ci/verl_env.sh`.
In an environment without verl the whole module is skipped (pytest.importorskip below).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here; run `bash .ci/verl_env.sh` (own venv, verl 0.9.1)")

from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import calibrl_kernels as ck  # noqa: E402
from calibrl_kernels import reference  # noqa: E402
from calibrl.integrations import _core  # noqa: E402
from calibrl.integrations import verl as cverl  # noqa: E402

B, T = 6, 7  # 2 groups x (2 on-policy + 1 expert)
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
IS_EXPERT = torch.tensor([False, False, True, False, False, True])


def actor_config(**overrides):
    kwargs = dict(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1)
    kwargs.update(overrides)
    return ActorConfig(**kwargs)


def synthetic_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=dtype)
    mask[1, 5:] = 0
    mask[2, 4:] = 0  # the first expert is shorter than the rollouts
    mask[4, 3:] = 0
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=-1e-3)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.1, 1.1, 1.1], dtype=dtype)
    stats = reference.group_advantages(scores, GROUPS, IS_EXPERT)
    baseline, expert_mask = reference.expert_baseline(old, mask, GROUPS, IS_EXPERT, return_mask=True)
    entropy = torch.rand(B, T, generator=g, dtype=dtype)
    return dict(old=old, logp=logp, mask=mask, scores=scores, stats=stats, baseline=baseline,
                expert_mask=expert_mask, entropy=entropy)


# ---------------------------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("name", sorted(cverl.POLICY_LOSSES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_registered_loss_equals_reference(name, agg):
    b = synthetic_batch()
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    mode = cverl.POLICY_LOSSES[name]
    token_adv = b["stats"].advantages[:, None] * b["mask"]  # verl hands token-level advantages
    lp_verl = b["logp"].clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=b["old"], log_prob=lp_verl, advantages=token_adv, response_mask=b["mask"].bool(),
        loss_agg_mode=agg, config=config, rollout_is_weights=None, expert_logp=b["baseline"],
        passed=b["stats"].passed, is_expert=IS_EXPERT, expert_mask=b["expert_mask"], entropy=b["entropy"],
    )
    loss.backward()
    cfg = ck.CalibRLConfig(mode=mode, clip_low=0.2, clip_high=0.28, loss_agg_mode=agg)
    lp_ref = b["logp"].clone().requires_grad_(True)
    expected = reference.calibrl_loss(
        lp_ref, b["old"], token_adv, b["mask"], expert_logp=b["baseline"], passed=b["stats"].passed,
        is_expert=IS_EXPERT, entropy=b["entropy"], config=cfg,
    )
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp_verl.grad, lp_ref.grad, rtol=1e-12, atol=1e-12)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(expected.clipfrac.item())
    assert metrics["actor/guide_loss"] == pytest.approx(expected.guide_loss.item())
    assert metrics["actor/onpolicy_entropy"] == pytest.approx(expected.entropy.item())
    assert loss.item() != 0.0


@pytest.mark.parametrize("name", ["calibrl", "calibrl_grpo", "calibrl_drgrpo", "calibrl_luffy"])
def test_registered_loss_equals_the_slim_trainer_path(name):
    """One batch: log-probs from the lm_head -> verl's registered loss == the slim trainer's
    calibrl.algorithms path (fused linear loss on hidden states), in values and in the gradients of
    hidden states and lm_head weight."""
    from calibrl import algorithms

    mode = cverl.POLICY_LOSSES[name]
    preset = ck.CalibRLConfig.for_algo(mode)
    b = synthetic_batch()
    g = torch.Generator().manual_seed(7)
    D, V = 5, 11
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    stats = algorithms.group_statistics(b["scores"], GROUPS, IS_EXPERT, preset)
    baseline, baseline_mask = algorithms.expert_baseline(b["old"], b["mask"], GROUPS, IS_EXPERT, preset)

    h_slim, w_slim = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    slim = algorithms.policy_loss(h_slim, w_slim, None, targets, b["old"], stats.advantages, b["mask"], stats.passed,
                                  IS_EXPERT, baseline, baseline_mask, preset)
    slim.loss.backward()

    h_verl, w_verl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = ck.linear_token_logprobs(h_verl, w_verl, targets, return_entropy=True)
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=b["old"], log_prob=logp, advantages=stats.advantages[:, None] * b["mask"],
        response_mask=b["mask"].bool(), loss_agg_mode=preset.loss_agg_mode,
        config=actor_config(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0), rollout_is_weights=None,
        expert_logp=baseline, passed=stats.passed, is_expert=IS_EXPERT, expert_mask=baseline_mask, entropy=entropy.detach(),
    )
    loss.backward()
    torch.testing.assert_close(loss, slim.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_verl.grad, h_slim.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_verl.grad, w_slim.grad, rtol=1e-9, atol=1e-12)
    assert metrics["actor/guide_loss"] == pytest.approx(slim.guide_loss.item())
    assert loss.item() != 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_term_matches_verl_vanilla(agg):
    """calibrl_dapo on a batch without expert rows == verl's own 'vanilla' dual-clip PPO loss."""
    b = synthetic_batch(seed=3)
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)[:, None] * b["mask"]
    outs = []
    for name in ("vanilla", "calibrl_dapo"):
        lp = b["logp"].clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(name)(
            old_log_prob=b["old"], log_prob=lp, advantages=adv, response_mask=b["mask"].bool(),
            loss_agg_mode=agg, config=config, rollout_is_weights=None,
        )
        loss.backward()
        outs.append((loss.detach(), lp.grad, metrics))
    # verl divides by the token count, calibrl_kernels by count + 1e-8 (CALIBRL.md): relative 1e-8 / count apart.
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-8, atol=1e-12)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert outs[0][2][key] == pytest.approx(outs[1][2][key])


def test_global_normalisation_matches_verl_agg_loss():
    """With verl's global batch info, the loss is normalised like verl's agg_loss (dp_size, global tokens)."""
    from verl.trainer.ppo.core_algos import agg_loss

    b = synthetic_batch(seed=5)
    adv = b["stats"].advantages[:, None] * b["mask"]
    on_policy_mask = b["mask"] * (~IS_EXPERT)[:, None]
    local_tokens = on_policy_mask.sum().item()
    config = actor_config()
    config.global_batch_info.update(dp_size=2, batch_num_tokens=3 * local_tokens, global_batch_size=None)
    loss, _ = get_policy_loss_fn("calibrl_dapo")(
        old_log_prob=b["old"], log_prob=b["logp"], advantages=adv, response_mask=b["mask"].bool(),
        loss_agg_mode="token-mean", config=config, is_expert=IS_EXPERT,
    )
    l_pg, _, _ = reference.ppo_token_terms(b["logp"], b["old"], adv, ck.CalibRLConfig(mode="dapo"))
    expected = agg_loss(l_pg, on_policy_mask, "token-mean", dp_size=2, batch_num_tokens=3 * local_tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


def test_calibrl_without_expert_fields_is_a_clear_error():
    b = synthetic_batch()
    with pytest.raises(ValueError, match="expert_logp/passed: loss_mode 'calibrl' needs.*trainer_mode=calibrl_sync"):
        get_policy_loss_fn("calibrl")(
            old_log_prob=b["old"], log_prob=b["logp"], advantages=b["mask"], response_mask=b["mask"].bool(),
            loss_agg_mode="token-mean", config=actor_config(),
        )
    with pytest.raises(ValueError, match="calibrl.clip_low: set it through verl's actor_rollout_ref.actor.clip_ratio_low"):
        cverl.loss_config("calibrl", actor_config(), "token-mean", {"clip_low": 0.1})
    with pytest.raises(ValueError, match=r"expert_logp: expected shape \(B, T\)"):
        get_policy_loss_fn("calibrl")(
            old_log_prob=b["old"], log_prob=b["logp"], advantages=b["mask"], response_mask=b["mask"].bool(),
            loss_agg_mode="token-mean", config=actor_config(), expert_logp=b["baseline"][:, :3],
            passed=b["stats"].passed, is_expert=IS_EXPERT,
        )


# ---------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("norm", [False, True])
def test_registered_advantage_estimator_equals_reference(norm):
    b = synthetic_batch()
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[:, 0] = b["scores"]
    uids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    adv, returns = get_adv_estimator_fn("calibrl")(
        token_level_rewards=rewards, response_mask=b["mask"], index=uids, is_expert=IS_EXPERT,
        norm_adv_by_std_in_grpo=norm,
    )
    expected = reference.group_advantages(b["scores"].float(), GROUPS, IS_EXPERT, norm_by_std=norm).advantages
    torch.testing.assert_close(adv, expected[:, None].double() * b["mask"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(returns, adv)
    with pytest.raises(ValueError, match="index: expected 6 uids"):
        get_adv_estimator_fn("calibrl")(token_level_rewards=rewards, response_mask=b["mask"], index=uids[:5])


def test_hybrid_rows_carry_what_the_actor_needs():
    b = synthetic_batch()
    uids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    rows = cverl.hybrid_rows(b["scores"].float(), uids, IS_EXPERT, b["old"].float(), b["mask"].float(), ck.CalibRLConfig())
    torch.testing.assert_close(rows[_core.FIELD_EXPERT_LOGP], b["baseline"].float())
    assert torch.equal(rows[_core.FIELD_PASSED], b["stats"].passed)
    assert rows["loss_mask"][IS_EXPERT].sum() == 0 and rows["loss_mask"][~IS_EXPERT].sum() == b["mask"][~IS_EXPERT].sum()
    with pytest.raises(ValueError, match="is_expert: expected exactly one expert row in every group"):
        cverl.hybrid_rows(b["scores"].float(), uids, torch.zeros(B, dtype=torch.bool) | torch.tensor([1, 1, 0, 0, 0, 1]).bool(),
                          b["old"].float(), b["mask"].float(), ck.CalibRLConfig())


# ---------------------------------------------------------------------------------------------- actor loss fn
def padded_actor_data(b, rows):
    """A verl actor micro-batch in padded layout plus the flat model output (what ppo_loss receives)."""
    from tensordict import TensorDict

    P = 3
    prompts = torch.ones(B, P, dtype=torch.long)
    responses = torch.ones(B, T, dtype=torch.long)
    attention_mask = torch.cat([torch.ones(B, P), b["mask"]], dim=1).long()
    flat_logp, flat_entropy = [], []
    for i in range(B):  # per sequence: P + len_i positions; position t predicts token t + 1
        n = int(b["mask"][i].sum())
        seq = torch.zeros(P + n, dtype=torch.float64)
        seq[P - 1 : P - 1 + n] = b["logp"][i, :n]
        flat_logp.append(seq)
        ent = torch.zeros(P + n, dtype=torch.float64)
        ent[P - 1 : P - 1 + n] = b["entropy"][i, :n]
        flat_entropy.append(ent)
    data = TensorDict(
        {"prompts": prompts, "responses": responses, "attention_mask": attention_mask,
         "response_mask": b["mask"].long(), "old_log_probs": b["old"], "advantages": rows["advantages"].double(),
         **{k: rows[k] for k in (_core.FIELD_IS_EXPERT, _core.FIELD_PASSED)},
         _core.FIELD_EXPERT_LOGP: rows[_core.FIELD_EXPERT_LOGP].double(),
         _core.FIELD_EXPERT_MASK: rows[_core.FIELD_EXPERT_MASK].float()},
        batch_size=[B],
    )
    for key, value in (("dp_size", 1), ("batch_num_tokens", None), ("global_batch_size", None)):
        data.set_non_tensor(key, value)
    logp = torch.cat(flat_logp).requires_grad_(True)
    return data, {"log_probs": logp, "entropy": torch.cat(flat_entropy)}, logp


def test_calibrl_ppo_loss_wrapper_equals_reference():
    b = synthetic_batch(seed=7)
    uids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    cfg = ck.CalibRLConfig()
    rows = cverl.hybrid_rows(b["scores"].float(), uids, IS_EXPERT, b["old"].float(), b["mask"].float(), cfg)
    data, model_output, flat_logp = padded_actor_data(b, rows)
    config = actor_config(policy_loss={"loss_mode": "calibrl"})
    loss, metrics = cverl.calibrl_ppo_loss(config, model_output, data)
    loss.backward()
    lp_ref = b["logp"].clone().requires_grad_(True)
    expected = reference.calibrl_loss(
        lp_ref, b["old"], rows["advantages"].double(), b["mask"], expert_logp=rows[_core.FIELD_EXPERT_LOGP].double(),
        passed=rows[_core.FIELD_PASSED], is_expert=IS_EXPERT, config=cfg,
    )
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-9)
    # gradient w.r.t. the flat log-probs lands on the response positions
    P = 3
    offset = 0
    for i in range(B):
        n = int(b["mask"][i].sum())
        torch.testing.assert_close(flat_logp.grad[offset + P - 1 : offset + P - 1 + n], lp_ref.grad[i, :n], rtol=1e-6, atol=1e-9)
        offset += P + n
    assert "actor/guide_loss" in metrics and "actor/pg_loss" in metrics


# ---------------------------------------------------------------------------------------------- plumbing
def test_plugin_entry_point_registers_everything_on_import_verl():
    """verl loads `verl.plugins` entry points on `import verl`: no explicit calibrl import is needed."""
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, ADV_ESTIMATOR_REGISTRY\n"
        "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY\n"
        "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
        "assert {'calibrl', 'calibrl_grpo', 'calibrl_dapo', 'calibrl_drgrpo', 'calibrl_luffy', 'calibrl_rlplus'}"
        " <= set(POLICY_LOSS_REGISTRY), sorted(POLICY_LOSS_REGISTRY)\n"
        "assert 'calibrl' in ADV_ESTIMATOR_REGISTRY\n"
        "assert 'calibrl_sync' in TRAINER_REGISTRY, sorted(TRAINER_REGISTRY)\n"
        "assert 'calibrl_expert_agent' in _agent_loop_registry, sorted(_agent_loop_registry)\n"
        "print('registered')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "registered" in result.stdout, result.stderr[-3000:]


def test_expert_response_ids_and_errors():
    from calibrl.integrations.verl_trainer import expert_response_ids, expert_text_of

    class Tok:
        eos_token_id = 9

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 8 for c in text]

    assert expert_response_ids(Tok(), "abc", 8) == [1, 2, 3, 9]
    assert expert_response_ids(Tok(), [{"role": "assistant", "content": "ab"}], 8) == [1, 2, 9]
    with pytest.raises(ValueError, match="expert: the expert completion has 5 tokens, more than actor_rollout_ref.rollout.response_length=3"):
        expert_response_ids(Tok(), "abcd", 3)
    with pytest.raises(ValueError, match="expert: expected a non-empty expert completion"):
        expert_response_ids(Tok(), "", 3)
    assert expert_text_of({"extra_info": {"expert": "x"}}) == "x"
    with pytest.raises(ValueError, match="expert: the dataset row has no 'expert' field"):
        expert_text_of({"raw_prompt": [], "extra_info": {}})


def test_example_config_composes_and_passes_verl_validation():
    """examples/verl/calibrl.yaml, as run_one_node.sh passes it, is a valid verl 0.9 configuration."""
    import os
    import re

    from hydra import compose, initialize_config_dir
    from verl.trainer import main_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "verl", "calibrl.yaml")
    lines = [re.sub(r"#.*", "", line).strip() for line in open(path)]
    overrides = [re.sub(r":\s*", "=", line, count=1) for line in lines if line] + [
        "actor_rollout_ref.model.path=/nonexistent", "data.train_files=/nonexistent.parquet",
        "data.val_files=/nonexistent.parquet", "data.train_batch_size=480", "actor_rollout_ref.actor.ppo_mini_batch_size=120",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8", "trainer.n_gpus_per_node=8", "trainer.nnodes=1",
    ]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(main_ppo.__file__), "config"), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    loss_cfg = cverl.loss_config(actor.policy_loss.loss_mode, actor, actor.loss_agg_mode, cverl.calibrl_overrides(dict(cfg.calibrl)))
    assert (loss_cfg.mode, loss_cfg.guide_coef, loss_cfg.negative_slope) == ("calibrl", 0.1, 0.5)
    assert cfg.trainer.v1.trainer_mode == "calibrl_sync" and cfg.algorithm.adv_estimator == "calibrl"
