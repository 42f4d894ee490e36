"""Shared helpers of the trainer tests: in-process quick runs, scripted rewards, metric comparison.

The tiny --quick model never answers correctly, so with real rewards every group fails, every advantage
is 0 and the RL loss is identically 0. ``scripted_rewards`` makes the runs exercise real updates: it
overrides the verifier's result of the on-policy rows, before group statistics, by a fixed rule of the
row's group id and position, so groups have mixed outcomes (and a DDP run and a one-process run on the
same prompts get the same rewards whatever they sampled).
"""

import contextlib
import json
import math
import os

import torch

from calibrl.rewards import FORMAT_WEIGHT
from calibrl.run_log import read_metrics
from calibrl.train import Trainer, main

TIMING_KEYS = {"step_time", "rollout_time", "tokens_per_s", "peak_memory_mb"}  # wall-clock dependent


def scripted_accuracy(group_ids, position):
    """(B,) 1.0 where on-policy row ``position`` of group ``group_ids`` counts as correct: (g + k) even."""
    return ((group_ids + position) % 2 == 0).float()


@contextlib.contextmanager
def scripted_rewards(log=None):
    """Within the block, Trainer._group_statistics first rescoring the on-policy rows by ``scripted_accuracy``.

    Rows are [n on-policy rows, expert row] per group, so a row's position in its group is its index
    modulo n + 1. With a list ``log``, every call appends the rows' group ids, prompt tokens, rewards,
    advantages and pass flags (what the DDP test compares with a one-process run).
    """
    original = Trainer._group_statistics

    def rescored(self, batch):
        position = torch.arange(len(batch)) % (self.cfg.rollouts_per_prompt + 1)  # (B,)
        on_policy = ~batch.is_expert
        accuracy = torch.where(on_policy, scripted_accuracy(batch.group_ids, position), batch.accuracy)
        batch.accuracy = accuracy
        batch.rewards = accuracy + FORMAT_WEIGHT * batch.format
        result = original(self, batch)
        if log is not None:
            prompts = [
                batch.prompts.input_ids[p][batch.prompts.attention_mask[p] == 1].tolist()
                for p in batch.prompt_index.tolist()
            ]
            log.append(
                {
                    "rank": self.dist.rank,
                    "step": self.step,
                    "group_ids": batch.group_ids.tolist(),
                    "position": position.tolist(),
                    "prompts": prompts,
                    "rewards": batch.rewards.tolist(),
                    "advantages": batch.advantages.tolist(),
                    "passed": batch.passed.tolist(),
                }
            )
        return result

    Trainer._group_statistics = rescored
    try:
        yield log
    finally:
        Trainer._group_statistics = original


def quick_run(out, *flags, tensorboard=False, log=None):
    """``python -m calibrl.train --quick --out OUT FLAGS`` in this process with scripted rewards; exit code."""
    with scripted_rewards(log):
        return main(
            ["--quick", "--out", str(out), "--tensorboard" if tensorboard else "--no-tensorboard", *map(str, flags)]
        )


def comparable(records):
    """Records without the wall-clock metrics, keyed by (phase, step)."""
    return {(r["phase"], r["step"]): {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def metrics(run_dir):
    return read_metrics(str(run_dir))


def rl_records(run_dir):
    """The records of RL steps 1, 2, ... (without the evaluation-only record of step 0)."""
    return [r for r in metrics(run_dir) if r["phase"] == "rl" and r["step"] > 0]


def all_finite(record):
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def saved_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as handle:
        return json.load(handle)


def rows_by_key(log):
    """{(step, group id, position): (prompt tokens, reward, advantage, passed)} of a scripted_rewards log."""
    rows = {}
    for call in log:
        for i, group in enumerate(call["group_ids"]):
            key = (call["step"], group, call["position"][i])
            rows[key] = (call["prompts"][i], call["rewards"][i], call["advantages"][i], call["passed"][i])
    return rows


def update_gradients(flags, dist, drop_experts_of_process=None):
    """The gradient of every optimizer step of one PPO update, as DDP leaves it (parameters never stepped).

    Every process builds the same global batch (same seed and prompts: the step's P groups), scores it
    with ``scripted_accuracy``, computes statistics and baseline on all of it, then keeps the rows of its
    own groups (a contiguous block per process, as the trainer shards prompts); one process keeps all.
    The expert rows of the groups of process ``drop_experts_of_process`` (of 2) are dropped, so that the
    processes hold different numbers of rows. Returns a list of flat (num_parameters,) gradients.
    """
    from calibrl import algorithms
    from calibrl.config import parse_config
    from calibrl.rollout import collect_rollouts, old_logprobs

    cfg = parse_config(["--quick", "--device", "cpu", "--no-tensorboard", *flags])
    trainer = Trainer(cfg, dist)
    params = list(trainer.policy.model.parameters())
    gradients = []

    def record_gradient(loss_finite=True):
        gradients.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.update.optimizer_step = record_gradient
    P, n = cfg.prompts_per_step, cfg.rollouts_per_prompt
    torch.manual_seed(1234)
    batch = collect_rollouts(trainer.policy, trainer.train_examples[:P], list(range(P)), n, cfg.max_new_tokens, 1.0)
    position = torch.arange(len(batch)) % (n + 1)
    batch.accuracy = torch.where(batch.is_expert, batch.accuracy, scripted_accuracy(batch.group_ids, position))
    batch.rewards = batch.accuracy + FORMAT_WEIGHT * batch.format
    batch.old_logp = old_logprobs(trainer.forward, batch, 1.0, 0)
    stats = algorithms.group_statistics(batch.rewards, batch.group_ids, batch.is_expert, trainer.loss_cfg)
    batch.advantages, batch.passed = stats.advantages.float(), stats.passed
    batch.baseline, batch.baseline_mask = algorithms.expert_baseline(
        batch.old_logp, batch.response_mask, batch.group_ids, batch.is_expert, trainer.loss_cfg
    )
    share = P // dist.world_size
    keep = batch.group_ids // share == dist.rank  # (B,) this process's groups
    if drop_experts_of_process is not None:
        keep &= ~(batch.is_expert & (batch.group_ids // (P // 2) == drop_experts_of_process))
    trainer.update(batch.select(keep.nonzero().squeeze(1)))
    return gradients
