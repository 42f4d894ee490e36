"""The CalibRL loss and advantage estimator registered in verl 0.9's registries, and the pieces that carry
expert rows to the actor.

verl 0.9.1 pins transformers <5.11, so these tests run in their own environment: `bash .ci/verl_env.sh`.
In an environment without verl the whole module is skipped (pytest.importorskip below).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here; run `bash .ci/verl_env.sh` (own venv, verl 0.9.1)")

from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import calibrl_kernels as ck  # noqa: E402
from calibrl.integrations import _core  # noqa: E402
from calibrl.integrations import verl as cverl  # noqa: E402
from calibrl_kernels import reference  # noqa: E402
from calibrl_kernels.config import LossInputs  # noqa: E402

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
    return dict(
        old=old,
        logp=logp,
        mask=mask,
        scores=scores,
        stats=stats,
        baseline=baseline,
        expert_mask=expert_mask,
        entropy=entropy,
    )


# ---------------------------------------------------------------------------------------------- policy loss
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def verl_policy_loss(name, b, log_prob, advantages, agg, config, **calibrl_fields):
    """(loss, metrics) of verl's registered policy loss ``name`` on the batch ``b``, called as verl's actor calls
    it; calibrl_fields: the batch fields the calibrl losses read besides verl's own arguments."""
    return get_policy_loss_fn(name)(
        old_log_prob=b["old"],
        log_prob=log_prob,
        advantages=advantages,
        response_mask=b["mask"].bool(),
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=None,
        **calibrl_fields,
    )


@pytest.mark.parametrize(
    "name, agg",
    [(n, a) for n in sorted(cverl.POLICY_LOSSES) if n != "calibrl_drgrpo" for a in AGGREGATIONS]
    + [("calibrl_drgrpo", "seq-mean-token-sum-norm")],
)
def test_registered_loss_equals_reference(name, agg):
    b = synthetic_batch()
    scale = float(T) if name == "calibrl_drgrpo" else None  # Dr.GRPO's constant divisor
    config = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_scale_factor=scale)
    mode = cverl.POLICY_LOSSES[name]
    token_adv = b["stats"].advantages[:, None] * b["mask"]  # verl hands token-level advantages
    fields = dict(expert_logp=b["baseline"], passed=b["stats"].passed, is_expert=IS_EXPERT, entropy=b["entropy"])
    lp_verl = b["logp"].clone().requires_grad_(True)
    loss, metrics = verl_policy_loss(name, b, lp_verl, token_adv, agg, config, expert_mask=b["expert_mask"], **fields)
    loss.backward()
    cfg = ck.CalibRLConfig(mode=mode, clip_low=0.2, clip_high=0.28, loss_agg_mode=agg, loss_scale_factor=scale)
    lp_ref = b["logp"].clone().requires_grad_(True)
    expected = reference.calibrl_loss(lp_ref, b["old"], token_adv, b["mask"], config=cfg, **fields)
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp_verl.grad, lp_ref.grad, rtol=1e-12, atol=1e-12)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(expected.clipfrac.item())
    assert metrics["actor/guide_loss"] == pytest.approx(expected.guide_loss.item())
    assert metrics["actor/pg_loss"] == pytest.approx(expected.pg_loss.item())  # without beta * guide
    assert metrics["actor/onpolicy_entropy"] == pytest.approx(expected.entropy.item())
    assert loss.item() != 0.0


@pytest.mark.parametrize("name", ["calibrl", "calibrl_grpo", "calibrl_drgrpo", "calibrl_luffy"])
def test_registered_loss_equals_the_slim_trainer_path(name):
    """One batch: log-probs from the lm_head -> verl's registered loss == the slim trainer's
    calibrl.algorithms path (fused linear loss on hidden states), in values and in the gradients of
    hidden states and lm_head weight."""
    from calibrl import algorithms

    mode = cverl.POLICY_LOSSES[name]
    scale = float(T) if mode == "drgrpo" else None
    preset = ck.CalibRLConfig.for_algo(mode, loss_scale_factor=scale)
    b = synthetic_batch()
    g = torch.Generator().manual_seed(7)
    D, V = 5, 11
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    stats = algorithms.group_statistics(b["scores"], GROUPS, IS_EXPERT, preset)
    baseline, baseline_mask = algorithms.expert_baseline(b["old"], b["mask"], GROUPS, IS_EXPERT, preset)

    h_slim, w_slim = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    slim = algorithms.policy_loss(
        h_slim,
        w_slim,
        None,
        targets,
        LossInputs(b["old"], stats.advantages, b["mask"], baseline, stats.passed, IS_EXPERT, baseline_mask),
        preset,
    )
    slim.loss.backward()

    h_verl, w_verl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = ck.linear_token_logprobs(h_verl, w_verl, targets, return_entropy=True)
    loss, metrics = verl_policy_loss(
        name,
        b,
        logp,
        stats.advantages[:, None] * b["mask"],
        preset.loss_agg_mode,
        actor_config(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_scale_factor=scale),
        expert_logp=baseline,
        passed=stats.passed,
        is_expert=IS_EXPERT,
        expert_mask=baseline_mask,
        entropy=entropy.detach(),
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
        loss, metrics = verl_policy_loss(name, b, lp, adv, agg, config)
        loss.backward()
        outs.append((loss.detach(), lp.grad, metrics))
    # verl divides by the token count, calibrl_kernels by count + 1e-8 (docs/method.md): relative 1e-8 / count apart.
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
    loss, _ = verl_policy_loss("calibrl_dapo", b, b["logp"], adv, "token-mean", config, is_expert=IS_EXPERT)
    l_pg, _, _ = reference.ppo_token_terms(b["logp"], b["old"], adv, ck.CalibRLConfig(mode="dapo"))
    expected = agg_loss(l_pg, on_policy_mask, "token-mean", dp_size=2, batch_num_tokens=3 * local_tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


def test_calibrl_without_expert_fields_is_a_clear_error():
    b = synthetic_batch()
    with pytest.raises(ValueError, match="expert_logp/passed: loss_mode 'calibrl' needs.*trainer_mode=calibrl_sync"):
        verl_policy_loss("calibrl", b, b["logp"], b["mask"], "token-mean", actor_config())
    with pytest.raises(
        ValueError, match="calibrl.clip_low: set it through verl's actor_rollout_ref.actor.clip_ratio_low"
    ):
        cverl.loss_config("calibrl", actor_config(), "token-mean", {"clip_low": 0.1})
    with pytest.raises(ValueError, match=r"expert_logp: expected shape \(B, T\)"):
        verl_policy_loss(
            "calibrl",
            b,
            b["logp"],
            b["mask"],
            "token-mean",
            actor_config(),
            expert_logp=b["baseline"][:, :3],
            passed=b["stats"].passed,
            is_expert=IS_EXPERT,
        )


# ---------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("norm", [False, True])
def test_registered_advantage_estimator_equals_reference(norm):
    b = synthetic_batch()
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[:, 0] = b["scores"]
    uids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    adv, returns = get_adv_estimator_fn("calibrl")(
        token_level_rewards=rewards,
        response_mask=b["mask"],
        index=uids,
        is_expert=IS_EXPERT,
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
    rows = cverl.hybrid_rows(
        b["scores"].float(), uids, IS_EXPERT, b["old"].float(), b["mask"].float(), ck.CalibRLConfig()
    )
    torch.testing.assert_close(rows[_core.FIELD_EXPERT_LOGP], b["baseline"].float())
    assert torch.equal(rows[_core.FIELD_PASSED], b["stats"].passed)
    assert (
        rows["loss_mask"][IS_EXPERT].sum() == 0 and rows["loss_mask"][~IS_EXPERT].sum() == b["mask"][~IS_EXPERT].sum()
    )
    with pytest.raises(ValueError, match="is_expert: expected exactly one expert row in every group"):
        cverl.hybrid_rows(
            b["scores"].float(),
            uids,
            torch.zeros(B, dtype=torch.bool) | torch.tensor([1, 1, 0, 0, 0, 1]).bool(),
            b["old"].float(),
            b["mask"].float(),
            ck.CalibRLConfig(),
        )


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
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention_mask,
            "response_mask": b["mask"].long(),
            "old_log_probs": b["old"],
            "advantages": rows["advantages"].double(),
            **{k: rows[k] for k in (_core.FIELD_IS_EXPERT, _core.FIELD_PASSED)},
            _core.FIELD_EXPERT_LOGP: rows[_core.FIELD_EXPERT_LOGP].double(),
            _core.FIELD_EXPERT_MASK: rows[_core.FIELD_EXPERT_MASK].float(),
        },
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
        lp_ref,
        b["old"],
        rows["advantages"].double(),
        b["mask"],
        expert_logp=rows[_core.FIELD_EXPERT_LOGP].double(),
        passed=rows[_core.FIELD_PASSED],
        is_expert=IS_EXPERT,
        config=cfg,
    )
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-9)
    # gradient w.r.t. the flat log-probs lands on the response positions
    P = 3
    offset = 0
    for i in range(B):
        n = int(b["mask"][i].sum())
        torch.testing.assert_close(
            flat_logp.grad[offset + P - 1 : offset + P - 1 + n], lp_ref.grad[i, :n], rtol=1e-6, atol=1e-9
        )
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
    from calibrl.integrations.verl.trainer import expert_response_ids, expert_text_of

    class Tok:
        eos_token_id = 9

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 8 for c in text]

    assert expert_response_ids(Tok(), "abc", 8) == [1, 2, 3, 9]
    assert expert_response_ids(Tok(), [{"role": "assistant", "content": "ab"}], 8) == [1, 2, 9]
    with pytest.raises(
        ValueError,
        match="expert: the expert completion has 5 tokens, more than actor_rollout_ref.rollout.response_length=3",
    ):
        expert_response_ids(Tok(), "abcd", 3)
    with pytest.raises(ValueError, match="expert: expected a non-empty expert completion"):
        expert_response_ids(Tok(), "", 3)
    assert expert_text_of({"extra_info": {"expert": "x"}}) == "x"
    with pytest.raises(ValueError, match="expert: the dataset row has no 'expert' field"):
        expert_text_of({"raw_prompt": [], "extra_info": {}})


def example_config(*overrides):
    """verl's ppo_trainer config composed with examples/verl/calibrl.yaml (as run_one_node.sh passes it), placeholder
    model and data paths, and ``overrides``."""
    import os
    import re

    from hydra import compose, initialize_config_dir
    from verl.trainer import main_ppo

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "verl", "calibrl.yaml")
    lines = [re.sub(r"#.*", "", line).strip() for line in open(path)]
    example = [re.sub(r":\s*", "=", line, count=1) for line in lines if line] + [
        "actor_rollout_ref.model.path=/nonexistent",
        "data.train_files=/nonexistent.parquet",
        "data.val_files=/nonexistent.parquet",
    ]
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(main_ppo.__file__), "config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=example + list(overrides))


def test_example_config_composes_and_passes_verl_validation():
    """examples/verl/calibrl.yaml, as run_one_node.sh passes it, is a valid verl 0.9 configuration."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = example_config(
        "data.train_batch_size=480",
        "actor_rollout_ref.actor.ppo_mini_batch_size=120",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=1",
    )
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    loss_cfg = cverl.loss_config(
        actor.policy_loss.loss_mode, actor, actor.loss_agg_mode, cverl.calibrl_overrides(dict(cfg.calibrl))
    )
    assert (loss_cfg.mode, loss_cfg.guide_coef, loss_cfg.negative_slope) == ("calibrl", 0.1, 0.5)
    assert cfg.trainer.v1.trainer_mode == "calibrl_sync" and cfg.algorithm.adv_estimator == "calibrl"


# ---------------------------------------------------------------------------------------------- end to end
# verl's own objects on CPU: a local Ray, a real TransferQueue, the agent loop's run(), the agent-loop
# worker's TransferQueue write, CalibRLSyncTrainer._compute_advantage, the workers' TransferQueue read, verl's
# micro-batch split and the loss installed with set_loss_fn. Only the rollout engine (a GPU server) is a stub.
N_ON, RESPONSE_LENGTH = 2, 12  # on-policy sessions per prompt (rollout.n = N_ON + 1)
PROMPTS = [("2+2?", "four", [1.0, 0.0]), ("3+3?", "six", [0.05, 0.0])]  # question, expert, on-policy rewards
EXPERT_REWARD = 1.1


def composed_config(*extra):
    """verl's ppo_trainer config with examples/verl/calibrl.yaml and a tiny CPU setting."""
    return example_config(
        "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "trainer.n_gpus_per_node=1",
        f"actor_rollout_ref.rollout.n={N_ON + 1}",
        f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
        f"data.max_response_length={RESPONSE_LENGTH}",
        *extra,
    )


class StubRolloutServer:
    """Stands in for verl's LLM server client (vLLM / SGLang need a GPU): fixed tokens per request."""

    def __init__(self):
        self.requests = 0

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests += 1
        length = 3 + self.requests % 5  # unequal lengths, none longer than the response length
        return TokenOutput(
            token_ids=[20 + (self.requests + t) % 30 for t in range(length)],
            extra_fields={"min_global_steps": 0, "max_global_steps": 0},
        )


def run_agent_loops(config, tokenizer, validation=False):
    """Every session of every prompt through CalibRLExpertAgentLoop.run: [(kwargs, AgentLoopOutput)]."""
    import asyncio

    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from calibrl.integrations.verl.trainer import VALIDATION_FLAG, CalibRLExpertAgentLoop

    server = StubRolloutServer()

    async def run_all():
        # built inside the running event loop, as verl's agent-loop worker builds it
        loop = CalibRLExpertAgentLoop(
            trainer_config=DictConfigWrap(config),
            server_manager=server,
            tokenizer=tokenizer,
            processor=None,
            dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data),
        )
        results = []
        for index, (question, expert, _) in enumerate(PROMPTS):
            for session in range(N_ON + 1):
                kwargs = dict(
                    raw_prompt=[{"role": "user", "content": question}],
                    extra_info={"expert": expert},
                    uid=f"p{index}",
                    session_id=session,
                    global_steps=1,
                    index=index,
                )
                if validation:
                    kwargs[VALIDATION_FLAG] = True
                results.append((kwargs, await loop.run(dict(temperature=1.0), **kwargs)))
        return results

    results = asyncio.run(run_all())
    return results, server.requests


@pytest.fixture(scope="module")
def ray_transfer_queue():
    ray = pytest.importorskip("ray")
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def written_rollouts(tq, config, tokenizer):
    """The agent loop's outputs written to the TransferQueue by verl's own agent-loop worker code, with rewards
    (as the reward loop sets them) and old log-probs (as _compute_old_log_prob writes them)."""
    import asyncio

    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    results, _ = run_agent_loops(config, tokenizer)
    worker = object.__new__(AgentLoopWorkerTQ.__ray_metadata__.modified_class)  # its methods, no Ray actor
    worker.config, worker.processor, worker.reward_loop_worker_handles = config, None, None
    worker.distillation_enabled = False
    for kwargs, output in results:
        index, session = PROMPTS[kwargs["index"]], kwargs["session_id"]
        output.reward_score = EXPERT_REWARD if session == N_ON else index[2][session]
        asyncio.run(worker._agent_loop_postprocess(output, False, **kwargs))
    listing = tq.kv_list("train")["train"]
    keys = sorted(listing)
    g = torch.Generator().manual_seed(11)
    data = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["response_mask"])
    old = [-0.2 - torch.rand(int(n), generator=g) * 2 for n in data["response_mask"].offsets().diff()]
    tq.kv_batch_put(
        keys=keys,
        partition_id="train",
        fields=TensorDict(
            {"old_log_probs": torch.nested.as_nested_tensor(old, layout=torch.jagged)}, batch_size=len(keys)
        ),
    )
    return KVBatchMeta(partition_id="train", keys=keys, tags=[listing[k] for k in keys]), results


def trainer_for(config):
    from calibrl.integrations.verl.trainer import CalibRLSyncTrainer

    trainer = object.__new__(CalibRLSyncTrainer)  # its advantage step and loss need only the config
    trainer.config = config
    return trainer


def worker_micro_batches(batch_meta, config, micro_batch_size=2):
    """What an actor worker receives (verl's TransferQueue bridge) split by verl's prepare_micro_batches."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.transferqueue_utils import _meta_to_realdata, kv_batch_meta2batch_meta
    from verl.workers.engine.utils import prepare_micro_batches

    data = _meta_to_realdata(kv_batch_meta2batch_meta(batch_meta))
    tu.assign_non_tensor(
        data,
        dp_size=1,
        batch_num_tokens=int(data["loss_mask"].values().sum()),
        global_batch_size=None,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=micro_batch_size,
    )
    micro_batches, _ = prepare_micro_batches(data)
    return data, micro_batches


def model_log_probs(micro_batch, new_logp_of):
    """Flat model output over prompt + response positions (position t predicts token t + 1), as verl's engines
    return it, from per-row response log-probs; one leaf tensor (for gradients)."""
    prompt_lens = micro_batch["prompts"].offsets().diff()
    flat, spans = [], []
    offset = 0
    for row, (p, r) in enumerate(zip(prompt_lens.tolist(), micro_batch["responses"].offsets().diff().tolist())):
        values = torch.zeros(p + r)
        values[p - 1 : p - 1 + r] = new_logp_of(row)
        flat.append(values)
        spans.append((offset + p - 1, r))
        offset += p + r
    return torch.cat(flat).requires_grad_(True), spans


def independent_calibrl_loss(lp, old, adv, on_policy, passed, baseline, entropy, cfg, entropy_coeff):
    """PPO dual clip + beta * |A| * leaky_relu(-s (lp - b)), token mean over on-policy tokens, written out here
    (no calibrl code); lp, old, baseline, entropy: lists of per-row response tensors."""
    total_pg, total_guide, total_entropy, count = 0.0, 0.0, 0.0, 0
    for i in range(len(lp)):
        if not on_policy[i]:
            continue
        ratio = torch.exp(torch.clamp(lp[i] - old[i], -20.0, 20.0))
        a = adv[i]
        l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1 - cfg["clip_low"], 1 + cfg["clip_high"])
        clipped = torch.maximum(l1, l2)
        pg = torch.minimum(clipped, torch.full_like(clipped, -cfg["c"] * a)) if a < 0 else clipped
        s = 1.0 if passed[i] else -1.0
        z = -s * (lp[i] - baseline[i])
        guide = abs(a) * torch.where(z > 0, z, cfg["alpha"] * z)
        total_pg = total_pg + pg.sum()
        total_guide = total_guide + guide.sum()
        total_entropy = total_entropy + entropy[i].sum()
        count += lp[i].numel()
    return (total_pg + cfg["beta"] * total_guide - entropy_coeff * total_entropy) / count, total_pg / count


def test_agent_loop_emits_expert_rows_and_none_in_validation():
    from _tiny_models import char_tokenizer

    from calibrl.integrations.verl.trainer import EXPERT_FLAG

    tokenizer = char_tokenizer()
    config = composed_config()
    results, requests = run_agent_loops(config, tokenizer)
    assert requests == N_ON * len(PROMPTS)  # the expert session asked the rollout engine for nothing
    for kwargs, output in results:
        is_expert = kwargs["session_id"] == N_ON
        assert output.extra_fields[EXPERT_FLAG] is is_expert
        if is_expert:
            text = PROMPTS[kwargs["index"]][1]
            expected = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            assert output.response_ids == expected and output.response_mask == [1] * len(expected)
            assert output.extra_fields["min_global_steps"] == output.extra_fields["max_global_steps"] == 0
    # validation with val_kwargs.n >= rollout.n: every session samples, no expert answer is scored
    results, requests = run_agent_loops(config, tokenizer, validation=True)
    assert requests == len(results) and not any(output.extra_fields[EXPERT_FLAG] for _, output in results)


def test_calibrl_sync_advantage_tq_round_trip_and_actor_loss(ray_transfer_queue):
    """The whole CalibRL path on verl's objects: every per-row field survives the TransferQueue, and the loss
    installed with set_loss_fn, run on verl's nested micro-batches, equals the formula written out above."""
    from _tiny_models import char_tokenizer

    tq = ray_transfer_queue
    config = composed_config("actor_rollout_ref.actor.entropy_coeff=0.01")
    batch_meta, results = written_rollouts(tq, config, char_tokenizer())
    before = tq.kv_batch_get(keys=batch_meta.keys, partition_id="train", select_fields=["loss_mask", "old_log_probs"])
    assert before["loss_mask"].dtype == torch.int64  # what verl's agent loop writes

    trainer = trainer_for(config)
    metrics = {}
    out_meta = trainer._compute_advantage(batch_meta, metrics)
    data, micro_batches = worker_micro_batches(out_meta, config)

    # every per-row field, read as a worker reads it, against values derived here from the rollouts
    B = len(batch_meta.keys)
    session_of = {f"p{k['index']}_{k['session_id']}_0": k for k, _ in results}
    kwargs = [session_of[key] for key in batch_meta.keys]
    is_expert = torch.tensor([k["session_id"] == N_ON for k in kwargs])
    scores = torch.tensor(
        [EXPERT_REWARD if k["session_id"] == N_ON else PROMPTS[k["index"]][2][k["session_id"]] for k in kwargs]
    )
    means = {g: sum(r) / len(r) for g, (_, _, r) in enumerate(PROMPTS)}
    adv = torch.tensor([scores[i].item() - means[k["index"]] for i, k in enumerate(kwargs)])
    old = [before["old_log_probs"][i] for i in range(B)]
    expert_row = {k["index"]: i for i, k in enumerate(kwargs) if k["session_id"] == N_ON}
    baseline = []
    for i, k in enumerate(kwargs):
        expert_old = old[expert_row[k["index"]]]
        b = torch.zeros(len(old[i]))
        n = min(len(b), len(expert_old))
        b[:n] = expert_old[:n]  # position-aligned, 0 past the expert's length
        baseline.append(b)
    assert torch.equal(data["calibrl_is_expert"], is_expert)
    assert torch.equal(data["calibrl_passed"], scores > 0.1)
    torch.testing.assert_close(data["calibrl_scores"], scores)
    torch.testing.assert_close(data["advantages"].to_padded_tensor(0.0)[:, 0], adv)
    assert data["loss_mask"].dtype == torch.int64
    counted = [0 if e else len(old[i]) for i, e in enumerate(is_expert)]  # expert rows out of verl's token count
    assert [int(data["loss_mask"][i].sum()) for i in range(B)] == counted
    for i in range(B):
        torch.testing.assert_close(data["calibrl_expert_logp"][i], baseline[i])
    assert len({g.item() for g in data["calibrl_group_ids"]}) == len(PROMPTS)
    assert metrics["calibrl/pass_rate"] == pytest.approx(1 / 4)
    assert metrics["calibrl/expert_reward"] == pytest.approx(EXPERT_REWARD)

    # the loss verl's actor would run, micro-batch by micro-batch, against the written-out formula
    g = torch.Generator().manual_seed(5)
    new_lp = [o + 0.4 * torch.randn(len(o), generator=g) for o in old]
    entropy = [torch.rand(len(o), generator=g) for o in old]
    loss_fn = trainer.actor_loss_fn()
    total, leaves, row = 0.0, [], 0
    pg_logged = 0.0
    for micro in micro_batches:
        first = row
        logp, spans = model_log_probs(micro, lambda r: new_lp[first + r])
        ent, _ = model_log_probs(micro, lambda r: entropy[first + r])
        loss, m = loss_fn(model_output={"log_probs": logp, "entropy": ent.detach()}, data=micro)
        total = total + loss
        assert m["actor/pg_loss"].aggregation.value == "sum"  # global normalisation: micro-batch terms add up
        pg_logged += float(sum(m["actor/pg_loss"].values))
        leaves.append((logp, spans))
        row += len(micro)
    total.backward()
    lp_leaf = [new_lp[i].detach().clone().requires_grad_(True) for i in range(B)]
    cfg = dict(clip_low=0.2, clip_high=0.2, c=3.0, beta=0.1, alpha=0.5)
    expected, expected_pg = independent_calibrl_loss(
        lp_leaf, old, adv.tolist(), (~is_expert).tolist(), (scores > 0.1).tolist(), baseline, entropy, cfg, 0.01
    )
    expected.backward()
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert float(pg_logged) == pytest.approx(expected_pg.item(), rel=1e-5)  # actor/pg_loss: no beta * guide
    row = 0
    for logp, spans in leaves:
        for start, length in spans:
            want = lp_leaf[row].grad if lp_leaf[row].grad is not None else torch.zeros(length)  # expert rows: none
            torch.testing.assert_close(logp.grad[start : start + length], want, rtol=1e-5, atol=1e-7)
            row += 1
    tq.kv_clear(keys=batch_meta.keys, partition_id="train")


def test_plugin_equals_verl_vanilla_loss_and_grpo_advantage_on_nested_micro_batches(ray_transfer_queue):
    """calibrl_dapo with std-normalised advantages through the TransferQueue == verl's GRPO advantage estimator
    on the on-policy rows and verl's ppo_loss with compute_policy_loss_vanilla on the same nested micro-batches."""
    from _tiny_models import char_tokenizer
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.workers.utils.losses import ppo_loss

    tq = ray_transfer_queue
    config = composed_config(
        "actor_rollout_ref.actor.policy_loss.loss_mode=calibrl_dapo",
        "algorithm.norm_adv_by_std_in_grpo=true",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
    )
    batch_meta, results = written_rollouts(tq, config, char_tokenizer())
    trainer = trainer_for(config)
    data, micro_batches = worker_micro_batches(trainer._compute_advantage(batch_meta, {}), config)

    rm = data["rm_scores"].to_padded_tensor(0.0)
    mask = data["response_mask"].to_padded_tensor(0)
    on_policy = ~data["calibrl_is_expert"]
    uids = [
        u
        for u, keep in zip(
            data["uid"].tolist() if hasattr(data["uid"], "tolist") else list(data["uid"]), on_policy.tolist()
        )
        if keep
    ]
    grpo, _ = compute_grpo_outcome_advantage(
        rm[on_policy], mask[on_policy], index=np.array(uids, dtype=object), norm_adv_by_std_in_grpo=True
    )
    ours = data["advantages"].to_padded_tensor(0.0)[on_policy]
    torch.testing.assert_close(ours, grpo.float(), rtol=1e-5, atol=1e-6)

    vanilla_config = omega_conf_to_dataclass_of(config, loss_mode="vanilla")
    plugin_fn = trainer.actor_loss_fn()
    g = torch.Generator().manual_seed(8)
    row = 0
    for micro in micro_batches:
        first = row
        new = [
            data["old_log_probs"][first + r] + 0.5 * torch.randn(len(data["old_log_probs"][first + r]), generator=g)
            for r in range(len(micro))
        ]
        lp_a, _ = model_log_probs(micro, lambda r: new[r])
        lp_b, _ = model_log_probs(micro, lambda r: new[r])
        loss_a, _ = plugin_fn(model_output={"log_probs": lp_a}, data=micro)
        # verl's stock loss sees the same micro-batch with the expert rows' advantages at 0 (the plugin drops them)
        stock = micro.clone()
        keep = (~micro["calibrl_is_expert"]).float()
        stock["advantages"] = torch.nested.as_nested_tensor(
            [micro["advantages"][r] * keep[r] for r in range(len(micro))], layout=torch.jagged
        )
        loss_b, _ = ppo_loss(vanilla_config, {"log_probs": lp_b}, stock)
        loss_a.backward()
        loss_b.backward()
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(lp_a.grad, lp_b.grad, rtol=1e-6, atol=1e-8)
        row += len(micro)
    tq.kv_clear(keys=batch_meta.keys, partition_id="train")


def omega_conf_to_dataclass_of(config, loss_mode):
    from omegaconf import open_dict
    from verl.utils.config import omega_conf_to_dataclass

    actor = config.actor_rollout_ref.actor.copy()
    with open_dict(actor):
        actor.policy_loss.loss_mode = loss_mode
    return omega_conf_to_dataclass(actor)


def test_dropped_transfer_queue_write_raises(ray_transfer_queue):
    """A write whose dtype differs from the field's existing dtype is dropped by the TransferQueue; put_verified
    raises naming the fields instead of letting the actor fail later."""
    from tensordict import TensorDict

    from calibrl.integrations.verl.trainer import put_verified

    tq = ray_transfer_queue
    keys = ["drop_0_0", "drop_1_0"]
    mask = torch.nested.as_nested_tensor(
        [torch.ones(3, dtype=torch.int64), torch.ones(2, dtype=torch.int64)], layout=torch.jagged
    )
    tq.kv_batch_put(
        keys=keys, partition_id="train", fields=TensorDict({"loss_mask": mask}, batch_size=2), tags=[{}, {}]
    )
    as_float = torch.nested.as_nested_tensor([torch.ones(3), torch.zeros(2)], layout=torch.jagged)
    with pytest.raises(RuntimeError, match="calibrl_passed: missing"):
        put_verified(
            keys,
            "train",
            TensorDict({"loss_mask": as_float, "calibrl_passed": torch.tensor([True, False])}, batch_size=2),
        )
    tq.kv_clear(keys=keys, partition_id="train")


# ---------------------------------------------------------------------------------------------- settings
def test_calibrl_drgrpo_is_dr_grpo_and_equals_verl_vanilla_with_its_aggregation():
    """calibrl_drgrpo refuses other aggregations; with Dr.GRPO's (per-sequence token sums / a constant) it equals
    verl's vanilla loss on a batch without expert rows, and differs from calibrl_grpo's per-sequence mean."""
    b = synthetic_batch(seed=4)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[:, None] * b["mask"]
    kwargs = dict(old_log_prob=b["old"], log_prob=b["logp"], advantages=adv, response_mask=b["mask"].bool())
    with pytest.raises(ValueError, match="calibrl_drgrpo is Dr.GRPO's aggregation.*seq-mean-token-sum-norm"):
        get_policy_loss_fn("calibrl_drgrpo")(**kwargs, loss_agg_mode="token-mean", config=actor_config())
    config = actor_config(loss_scale_factor=64.0)
    config.global_batch_info["loss_scale_factor"] = 64.0  # as verl's ppo_loss sets it
    dr, _ = get_policy_loss_fn("calibrl_drgrpo")(**kwargs, loss_agg_mode="seq-mean-token-sum-norm", config=config)
    vanilla, _ = get_policy_loss_fn("vanilla")(**kwargs, loss_agg_mode="seq-mean-token-sum-norm", config=config)
    grpo, _ = get_policy_loss_fn("calibrl_grpo")(**kwargs, loss_agg_mode="seq-mean-token-mean", config=config)
    torch.testing.assert_close(dr, vanilla, rtol=1e-10, atol=1e-12)
    assert abs(dr.item() - grpo.item()) > 1e-3


def test_ppo_kl_metric_is_clamped_like_verl():
    b = synthetic_batch(seed=6)
    logp = b["logp"].clone()
    logp[0, 0] = b["old"][0, 0] + 30.0  # a runaway ratio: verl clamps the log-ratio at 20
    adv = b["mask"] * 0.5
    metrics = [
        get_policy_loss_fn(name)(
            old_log_prob=b["old"],
            log_prob=logp,
            advantages=adv,
            response_mask=b["mask"].bool(),
            loss_agg_mode="token-mean",
            config=actor_config(),
        )[1]
        for name in ("vanilla", "calibrl_dapo")
    ]
    assert metrics[1]["actor/ppo_kl"] == pytest.approx(metrics[0]["actor/ppo_kl"], rel=1e-9)


EXAMPLE_PROBLEMS = [
    ("actor_rollout_ref.actor.loss_agg_mode=token-sum", "actor_rollout_ref.actor.loss_agg_mode: the CalibRL losses"),
    ("algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is: .*set it to null"),
    ("algorithm.rollout_correction.bypass_mode=true", "bypass_mode: .*expert rows.*set it to false"),
    ("algorithm.use_kl_in_reward=true", "algorithm.use_kl_in_reward: .*use_kl_loss=true"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=calibrl_drgrpo", "calibrl_drgrpo is Dr.GRPO's aggregation"),
    ("trainer.v1.trainer_mode=sync", "trainer.v1.trainer_mode: loss_mode 'calibrl' needs expert rows"),
    ("+calibrl.mask_beyond_expert=true", "calibrl.mask_beyond_expert: .*use mask_beyond_expert=false"),
    ("+calibrl.clip_low=0.1", "calibrl.clip_low: set it through verl's actor_rollout_ref.actor.clip_ratio_low"),
]


@pytest.mark.parametrize("override, message", EXAMPLE_PROBLEMS)
def test_unsupported_settings_are_refused_at_start_up(override, message):
    """Each refused setting is named, with the alternative, before any worker starts (trainer construction)."""
    import re

    from calibrl.integrations.verl.trainer import CalibRLSyncTrainer

    config = composed_config(override)
    problems = cverl.startup_problems(config)
    assert any(re.search(message, problem) for problem in problems), problems
    with pytest.raises(ValueError, match=message):
        CalibRLSyncTrainer(config)


def test_example_config_starts_a_synchronous_trainer_and_sizes_the_transfer_queue():
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from calibrl.integrations.verl.main import check_before_ray
    from calibrl.integrations.verl.trainer import CalibRLSyncTrainer

    config = composed_config()
    assert cverl.startup_problems(config) == []
    trainer = CalibRLSyncTrainer(config)  # no worker starts here
    assert type(trainer.replay_buffer) is ReplayBuffer and not isinstance(trainer.replay_buffer, ReplayBufferAsync)
    assert trainer.trainer_mode == "sync"
    # verl's default 8 storage units cannot be scheduled on 2 Ray CPUs: refused before Ray starts
    with pytest.raises(
        ValueError,
        match="num_data_storage_units: 8 storage units .* need 9 Ray CPUs, the cluster has 2, .*set it to at most 1",
    ):
        check_before_ray(composed_config("ray_kwargs.ray_init.num_cpus=2"))
    check_before_ray(
        composed_config(
            "ray_kwargs.ray_init.num_cpus=2", "transfer_queue.backend.SimpleStorage.num_data_storage_units=1"
        )
    )
