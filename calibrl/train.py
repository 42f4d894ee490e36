"""``python -m calibrl.train``: hybrid-policy RL (CalibRL and the baselines) on a small multimodal model.

The default run (no arguments, CPU, no network) builds a tiny Qwen2-VL model and a tokenizer offline,
warm-starts it on easy-vqa's expert responses, then runs RL: each step samples n responses for each
of P prompts at temperature 1, adds each prompt's expert response, scores them (accuracy + 0.1 *
format), computes group statistics, and takes PPO-style steps on the algorithm's loss, computed by
``calibrl_kernels.fused_linear_calibrl_loss`` from the final hidden states and the lm_head weight.
Under ``torchrun --nproc_per_node N`` prompts are sharded over processes (DDP; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from . import algorithms, checkpoint, distributed
from .config import TrainConfig, config_from_dict, merge_resume, parse_config
from .data import PromptSampler, load_examples
from .evaluate import evaluate
from .logging import RECORD_FILES, RunLogger, peak_memory_mb, rollout_metrics, truncate_records
from .model import Policy, PolicyForward, build_tiny_policy, load_policy
from .rollout import IGNORE_INDEX, RolloutBatch, collate_responses, collect_rollouts, old_logprobs, sequence_inputs

INTERRUPTED_EXIT_CODE = 130


class Trainer:
    """Holds the run's state: policy, optimizer, data order, phase ("sft" then "rl") and step."""

    def __init__(self, cfg: TrainConfig, dist: distributed.DistInfo):
        resumed = checkpoint.load_checkpoint(_resume_path(cfg)) if cfg.resume else None
        self.cfg = merge_resume(config_from_dict(resumed["config"]), cfg) if resumed else cfg
        self.dist = dist
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _seed_everything(cfg.seed + 1000 * dist.rank)
        self.run_dir = cfg.resume or cfg.run_dir()
        self.train_examples = load_examples(cfg.data, "train", cfg.train_examples)
        self.eval_examples = self._eval_examples()
        self.algorithm = algorithms.make_algorithm(cfg.algo, cfg.loss)
        self.loss_cfg = self.algorithm.loss
        self.policy = self._build_policy(resumed is not None)
        self.policy.model.to(dist.device)
        self.forward = PolicyForward(self.policy)
        self.update_module = self._wrap_ddp(self.forward)
        self.sft_total = cfg.sft_steps + (cfg.extra_sft_steps if self.algorithm.long_sft else 0)
        self.sampler = PromptSampler(len(self.train_examples), cfg.seed)
        self.phase, self.step = "sft", 0
        self.optimizer, self.scheduler = self._make_optimizer("sft")
        self.interrupted = False
        if resumed:
            self._restore(resumed)
        elif dist.is_main:
            self._start_run_dir()

    # ---------------------------------------------------------------------------------------- setup
    def _eval_examples(self) -> list:
        cfg = self.cfg
        if cfg.eval_data:
            examples = load_examples(cfg.eval_data, "test")
        elif cfg.data == "easy-vqa":
            examples = load_examples("easy-vqa", "test")
        else:
            return []
        return examples[:cfg.eval_examples] if cfg.eval_examples else examples

    def _build_policy(self, resuming: bool) -> Policy:
        cfg = self.cfg
        if cfg.model:
            return load_policy(cfg.model, cfg, self.dist.device)
        if resuming:  # the run's own tokenizer; the weights come from the checkpoint
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.path.join(self.run_dir, "tokenizer"))
            return build_tiny_policy(cfg, [], self.dist.device, tokenizer=tokenizer)
        texts = [t for e in self.train_examples + self.eval_examples for t in (e.question, e.expert, e.answer)]
        return build_tiny_policy(cfg, texts + ["user\n", "assistant\n"], self.dist.device)

    def _wrap_ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.active:
            return module
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _make_optimizer(self, phase: str):
        cfg = self.cfg
        lr = cfg.sft_lr if phase == "sft" else cfg.lr
        optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
        return optimizer, scheduler

    def _start_run_dir(self) -> None:
        if checkpoint.list_checkpoints(self.run_dir):
            raise ValueError(f"out: {self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                             "or choose another --out")
        os.makedirs(self.run_dir, exist_ok=True)
        for name in RECORD_FILES:  # left over from a run that never reached its first checkpoint
            if os.path.exists(os.path.join(self.run_dir, name)):
                os.remove(os.path.join(self.run_dir, name))
        with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(self.cfg.to_dict(), handle, indent=2)
        if not self.cfg.model:
            self.policy.tokenizer.save_pretrained(os.path.join(self.run_dir, "tokenizer"))

    def _autocast(self):
        if self.dist.device.type == "cuda" and self.cfg.dtype == "auto":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def index(self) -> int:
        """Monotonic step index over both phases (names the checkpoint files)."""
        return self.step if self.phase == "sft" else self.sft_total + self.step

    def save(self) -> None:
        rng = distributed.gather_objects(checkpoint.capture_rng(), self.dist)
        if not self.dist.is_main:
            return
        state = {
            "model": self.policy.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "phase": self.phase, "step": self.step,
            "sampler": self.sampler.state_dict(), "rng": rng, "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
        }
        checkpoint.save_checkpoint(self.run_dir, self.index, state, self.cfg.keep_checkpoints)

    def _restore(self, state: dict) -> None:
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"--resume: the run used {state['world_size']} processes, this one {self.dist.world_size}")
        self.policy.model.load_state_dict(state["model"])
        self.phase, self.step = state["phase"], state["step"]
        self.optimizer, self.scheduler = self._make_optimizer(self.phase)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.restore_rng(state["rng"][self.dist.rank])
        if self.dist.is_main:
            for name in RECORD_FILES:
                truncate_records(os.path.join(self.run_dir, name), self.phase, self.step)

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        logger = RunLogger(self.run_dir, self.dist.is_main, cfg.tensorboard, cfg.progress,
                           self.sft_total + cfg.max_steps, self.index)
        logger.message(f"calibrl: {cfg.algo} ({self.algorithm.summary}); run folder {self.run_dir}")
        start = time.time()
        try:
            while self.phase == "sft" and self.step < self.sft_total:
                self.step += 1
                logger.log(self.sft_step(), self.index)
                if self._end_of_step(logger):
                    return INTERRUPTED_EXIT_CODE
            if self.phase == "sft":  # warm start done: fresh optimizer for RL, evaluate the starting point
                self.phase, self.step = "rl", 0
                self.optimizer, self.scheduler = self._make_optimizer("rl")
                logger.message(f"warm start done; RL for {cfg.max_steps} steps")
                self._log_eval({"phase": "rl", "step": 0}, logger)
            while self.step < cfg.max_steps:
                self.step += 1
                record = self.rl_step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    record.update(self._evaluate())
                logger.log(record, self.index)
                if self._end_of_step(logger):
                    return INTERRUPTED_EXIT_CODE
            self.save()
            if self.dist.is_main:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                self.policy.save_pretrained(os.path.join(self.run_dir, "final_model"))
            logger.message(f"done in {time.time() - start:.1f} s; metrics in {self.run_dir}/metrics.jsonl")
            return 0
        finally:
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True

    def _end_of_step(self, logger: RunLogger) -> bool:
        """Checkpoint when due; on Ctrl-C (any process) save and report True."""
        stop = distributed.any_rank(self.interrupted, self.dist)
        if stop or self.step % self.cfg.save_every == 0:
            self.save()
        if stop:
            logger.message(f"interrupted: saved {self.phase} step {self.step}; continue with --resume {self.run_dir}")
        return stop

    def _evaluate(self) -> Dict[str, float]:
        """Greedy held-out metrics; a few answers go to samples.jsonl (main process)."""
        if not self.eval_examples:
            return {}
        results, samples = evaluate(self.policy, self.eval_examples, self.cfg.max_new_tokens, self.cfg.eval_batch_size,
                                    self.loss_cfg.temperature, self.dist)
        if self.dist.is_main:
            with open(os.path.join(self.run_dir, "samples.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"phase": self.phase, "step": self.step, "samples": samples}) + "\n")
        return results

    def _log_eval(self, record: dict, logger: RunLogger) -> None:
        record.update(self._evaluate())
        logger.log(record, self.index, advance=False)
        if "eval_accuracy" in record:
            logger.message(f"held-out accuracy {record['eval_accuracy']:.3f} (greedy), "
                           f"{record['eval_sampled_accuracy']:.3f} (sampled) at {record['phase']} step {record['step']}")

    # ------------------------------------------------------------------------------- one SFT step
    def _my_prompts(self, count: int) -> List[int]:
        """This process's share of the next ``count`` prompts of the data order (contiguous block)."""
        if count % self.dist.world_size:
            raise ValueError(f"{count} prompts per step cannot be split evenly over {self.dist.world_size} processes")
        indices = self.sampler.next_indices(count)
        share = count // self.dist.world_size
        return indices[self.dist.rank * share:(self.dist.rank + 1) * share]

    def sft_step(self) -> dict:
        """One supervised step on expert responses (token-mean NLL via linear_token_logprobs)."""
        started = time.time()
        examples = [self.train_examples[i] for i in self._my_prompts(self.cfg.sft_batch_size)]
        prompts = self.policy.encode_prompts(examples)
        response_ids, response_mask = collate_responses([self.policy.encode_response(e.expert) for e in examples],
                                                        self.policy.pad_token_id)  # (R, T)
        inputs = sequence_inputs(prompts, torch.arange(len(examples)), response_ids, response_mask, self.dist.device)
        targets = response_ids.masked_fill(response_mask == 0, IGNORE_INDEX).to(self.dist.device)  # (R, T)
        with self._autocast():
            hidden, weight, bias = self.update_module(**inputs)  # (R, T, D), (V, D)
        loss, tokens = algorithms.sft_loss(hidden, weight, bias, targets)  # plain NLL at temperature 1
        loss.backward()
        grad_norm = self._optimizer_step()
        totals = distributed.all_reduce_sum(torch.tensor([loss.item(), float(tokens)], device=self.dist.device), self.dist)
        elapsed = time.time() - started
        return {"phase": "sft", "step": self.step, "sft_loss": totals[0].item() / self.dist.world_size,
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "step_time": elapsed,
                "tokens_per_s": totals[1].item() / elapsed, "peak_memory_mb": peak_memory_mb(self.dist.device)}

    def _optimizer_step(self) -> float:
        params = [p for p in self.policy.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -------------------------------------------------------------------------------- one RL step
    def rl_step(self) -> dict:
        """Rollouts -> rewards -> group statistics (all processes) -> baseline -> PPO updates."""
        cfg, dist = self.cfg, self.dist
        started = time.time()
        mine = self._my_prompts(cfg.prompts_per_step)
        first_group = dist.rank * len(mine)  # group ids are positions in the step's global prompt list
        batch = collect_rollouts(self.policy, [self.train_examples[i] for i in mine],
                                 list(range(first_group, first_group + len(mine))), cfg.rollouts_per_prompt,
                                 cfg.max_new_tokens, self.loss_cfg.temperature)  # B = P_local * (n + 1) rows
        rollout_time = time.time() - started
        batch.old_logp = old_logprobs(self.forward, batch, self.loss_cfg.temperature, cfg.micro_batch_rows,
                                      self._autocast)  # (B, T)
        stats, local_group_index = self._group_statistics(batch)
        baseline, baseline_mask = algorithms.expert_baseline(batch.old_logp, batch.response_mask, batch.group_ids,
                                                             batch.is_expert, self.loss_cfg)  # (B, T) each
        keep = algorithms.expert_keep_mask(local_group_index, batch.is_expert, stats["pass_rate_local"],
                                           cfg.mixup_policy, cfg.mix_ratio, cfg.pass_ratio_low, cfg.pass_ratio_high)
        rows = keep.nonzero().squeeze(1)  # (B_kept,)
        update = self._ppo_update(batch.select(rows), stats["advantages"][rows], stats["passed"][rows],
                                  baseline[rows], baseline_mask[rows])
        elapsed = time.time() - started
        record = {"phase": "rl", "step": self.step, **rollout_metrics(batch, stats["pass_rate"], keep, dist), **update}
        record.update(step_time=elapsed, rollout_time=rollout_time, lr=self.scheduler.get_last_lr()[0],
                      tokens_per_s=record["sampled_tokens"] / elapsed, peak_memory_mb=peak_memory_mb(dist.device))
        return record

    def _group_statistics(self, batch: RolloutBatch):
        """Group statistics over every process's rows (gathered first), sliced back to this process."""
        dist = self.dist
        rewards = distributed.all_gather_rows(batch.rewards.to(dist.device), dist).cpu()  # (B_global,)
        group_ids = distributed.all_gather_rows(batch.group_ids.to(dist.device), dist).cpu()  # (B_global,)
        is_expert = distributed.all_gather_rows(batch.is_expert.to(dist.device, torch.uint8), dist).cpu().bool()
        stats = algorithms.group_statistics(rewards, group_ids, is_expert, self.loss_cfg)
        mine = slice(dist.rank * len(batch), (dist.rank + 1) * len(batch))
        group_index = stats.group_index[mine]  # (B,) into the global groups
        local_groups, local_group_index = torch.unique(group_index, sorted=True, return_inverse=True)
        return {
            "advantages": stats.advantages[mine].float(), "passed": stats.passed[mine],  # (B,) each
            "pass_rate": stats.pass_rate, "pass_rate_local": stats.pass_rate[local_groups],  # (G,), (G_local,)
        }, local_group_index

    def _ppo_update(self, batch: RolloutBatch, advantages, passed, baseline, baseline_mask) -> Dict[str, float]:
        """ppo_epochs passes; each splits the groups into mini_batches optimizer steps."""
        groups = torch.unique(batch.group_ids)  # (G_local,)
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.ppo_epochs):
            order = groups[torch.randperm(len(groups))]
            for chunk in torch.tensor_split(order, self.cfg.mini_batches):
                rows = torch.isin(batch.group_ids, chunk).nonzero().squeeze(1)  # (R,)
                metrics = self._minibatch_step(batch.select(rows), advantages[rows], passed[rows], baseline[rows],
                                               baseline_mask[rows])
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        means = torch.tensor([sums[k] / count for k in sorted(sums)], dtype=torch.float64, device=self.dist.device)
        means = distributed.all_reduce_sum(means, self.dist).cpu() / self.dist.world_size
        return dict(zip(sorted(sums), means.tolist()))

    def _minibatch_step(self, batch: RolloutBatch, advantages, passed, baseline, baseline_mask) -> Dict[str, float]:
        """Forward/backward over micro-batches (gradients accumulated, weighted by rows), then one step."""
        device = self.dist.device
        micro_rows = self.cfg.micro_batch_rows or len(batch)
        num_micro = int(distributed.all_reduce_max(math.ceil(len(batch) / micro_rows), self.dist))
        outputs = []
        for k, rows in enumerate(torch.tensor_split(torch.arange(len(batch)), num_micro)):
            micro = batch.select(rows)
            last = k == num_micro - 1
            sync = contextlib.nullcontext() if last or not self.dist.active else self.update_module.no_sync()
            with sync:
                with self._autocast():
                    hidden, weight, bias = self.update_module(**micro.forward_inputs(device))  # (R, T, D), (V, D)
                out = algorithms.policy_loss(
                    hidden, weight, bias, micro.targets().to(device), micro.old_logp.to(device),
                    advantages[rows].to(device), micro.response_mask.to(device), passed[rows].to(device),
                    micro.is_expert.to(device), baseline[rows].to(device), baseline_mask[rows].to(device),
                    self.loss_cfg,
                )
                (out.loss * (len(rows) / len(batch))).backward()
            outputs.append(out.metrics())
        metrics = {key: float(np.mean([o[key] for o in outputs])) for key in outputs[0]}
        metrics["grad_norm"] = self._optimizer_step()
        return metrics


# ------------------------------------------------------------------------------------------- helpers
def _resume_path(cfg: TrainConfig) -> str:
    path = checkpoint.latest_checkpoint(cfg.resume)
    if path is None:
        raise ValueError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(cfg.resume)}")
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_config(argv)
    dist = distributed.init(cfg.device)
    try:
        return Trainer(cfg, dist).run()
    finally:
        distributed.shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
