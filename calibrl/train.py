"""``python -m calibrl.train``: hybrid-policy RL (CalibRL and the baselines) on a small multimodal model.

The default run (no arguments, CPU, no network) builds a tiny Qwen2-VL model and a tokenizer offline,
warm-starts it on easy-vqa's expert responses, then runs RL: each step samples n responses for each
of P prompts at temperature 1, adds each prompt's expert response, scores them (accuracy + 0.1 *
format), computes group statistics, and takes PPO-style steps on the algorithm's loss, computed by
``calibrl_kernels.fused_linear_calibrl_loss`` from the final hidden states and the lm_head weight.
Under ``torchrun --nproc_per_node N`` prompts are sharded over processes (DDP; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

from . import algorithms, checkpoint, distributed
from .config import ConfigError, TrainConfig, build_parser, config_from_dict, merge_resume, parse_config
from .data import DataRows, PromptSampler, RowError, changed_rows, load_eval_rows, load_rows
from .diagnostics import guide_regime
from .evaluate import evaluate
from .exploration import rollout_exploration
from .model import Policy, PolicyForward, build_tiny_policy, load_policy
from .rewards import GuardedScorer, load_function, load_reward_fn
from .rollout import RolloutBatch, collate_responses, collect_rollouts, old_logprobs, response_targets, sequence_inputs
from .run_lock import RunLock
from .run_log import RunLogger, peak_memory_mb, reset_peak_memory, rollout_metrics, start_run_dir, truncate_run
from .step_guard import NonFiniteGuard, TooManyBadSteps, nonfinite_tensors
from .update import PPOUpdate

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C saved a checkpoint and stopped the run
FAILED_EXIT_CODE = 1  # a checkpoint could not be written (e.g. a full disk): the older ones are intact
BAD_STEPS_EXIT_CODE = 3  # max_bad_steps steps in a row had a non-finite loss or gradient; last good state saved


def interrupted_exit_code(signum: int) -> int:
    """Exit status of a run stopped by signal ``signum`` after saving: 128 + signum (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + signum


class Trainer:
    """Holds the run's state: policy, optimizer, data order, phase ("sft" then "rl") and step."""

    def __init__(self, cfg: TrainConfig, dist: distributed.DistInfo):
        self.dist = dist
        self.run_dir = cfg.validate().resume or cfg.run_dir()
        self.lock = self._lock(self.run_dir, dist)  # one trainer per run folder
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (the lock); the trainer does not run afterwards."""
        if self.lock is not None:
            self.lock.release()

    def _setup(self, cfg: TrainConfig) -> None:
        dist = self.dist
        resumed_path, resumed = self._load_resumed(cfg.resume, dist) if cfg.resume else (None, None)
        self.cfg = merge_resume(config_from_dict(resumed["config"], resumed_path), cfg) if resumed else cfg
        cfg = self.cfg.check_processes(dist.world_size)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        checkpoint.seed_everything(cfg.seed + 1000 * dist.rank)
        self.data = self._load_data()  # {setting: DataRows}, each line checked (UTF-8, JSON, fields, image file)
        try:
            self.scorer = GuardedScorer(load_reward_fn(cfg.reward_fn, cfg.reward_format))
            extra = load_function(cfg.eval_metrics, "eval_metrics") if cfg.eval_metrics else None
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.truncation_fails = cfg.reward_format == "strict"  # a response cut at max_new_tokens scores 0
        self.eval_options = dict(samples=cfg.eval_samples, truncation_fails=self.truncation_fails, extra_metrics=extra)
        self.algorithm = algorithms.make_algorithm(cfg.algo, cfg.loss)
        self.loss_cfg = self.algorithm.loss
        self.policy = self._build_policy(resumed is not None)
        self._check_data()  # every row as the policy will encode it (images, special tokens)
        self.train_rows = self.data["data"]
        self.train_examples = self.train_rows.rows  # by position; None where a bad row is skipped
        self.eval_examples, self.ood_examples = self.data["eval_data"].good(), self.data["ood_eval_data"].good()
        self.policy.model.to(dist.device)
        self.forward = PolicyForward(self.policy)
        self.update_module = distributed.wrap_ddp(self.forward, dist)  # what the update's passes call
        self.update = PPOUpdate(self.update_module, self.loss_cfg, cfg, dist, self._optimizer_step)
        self.sft_total = cfg.sft_steps + (cfg.extra_sft_steps if self.algorithm.long_sft else 0)
        self.sampler = PromptSampler(len(self.train_rows.rows), cfg.seed, self.train_rows.skipped())
        self.guard = NonFiniteGuard(cfg.max_bad_steps, dist)
        self.phase, self.step = "sft", 0
        self.optimizer, self.scheduler = self._make_optimizer("sft")
        self.last_lr = 0.0  # learning rate of the latest optimizer step
        self.interrupted = 0  # the signal number of a Ctrl-C (SIGINT) or SIGTERM, 0 while none came
        self.saved_index = None  # index of the last checkpoint written (the final save skips a repeat)
        if resumed:
            self._restore(resumed, resumed_path)
        elif dist.is_main:
            start_run_dir(self.run_dir, self.cfg.to_dict(), None if cfg.model else self.policy.tokenizer)

    # ---------------------------------------------------------------------------------------- setup
    @staticmethod
    def _lock(run_dir: str, dist: distributed.DistInfo) -> Optional[RunLock]:
        """The run folder's lock, taken by the main process; a folder in use stops every process."""
        lock, error = None, None
        if dist.is_main:
            try:
                lock = RunLock(run_dir).acquire()
            except ConfigError as failure:
                error = str(failure)
        error = distributed.broadcast_object(error, dist)
        if error is not None:
            raise ConfigError(error)
        return lock

    @staticmethod
    def _load_resumed(run_dir: str, dist: distributed.DistInfo):
        """(path, state) of the newest good checkpoint of ``run_dir``, chosen by the main process (bad ones,
        and ones of another format, skipped with a warning) so that every process loads the same file, even
        one the main process is still pruning."""
        path, state, error = None, None, None
        if dist.is_main:
            try:
                path, state = checkpoint.load_latest(run_dir, checkpoint.trainer_state_problem)
            except ConfigError as failure:
                error = str(failure)
        path, error = distributed.broadcast_object((path, error), dist)
        if error is not None:
            raise ConfigError(error)
        return path, state if state is not None else checkpoint.load_checkpoint(path)

    def _load_data(self) -> Dict[str, DataRows]:
        """The rows of data, eval_data and ood_eval_data; a bad line is a ConfigError naming the setting and
        its file:line, or is skipped (skip_bad_rows)."""
        cfg, skip = self.cfg, self.cfg.skip_bad_rows
        loaders = {
            "data": lambda: load_rows(cfg.data, "train", cfg.train_examples, skip),
            "eval_data": lambda: load_eval_rows(cfg.data, cfg.eval_data, cfg.eval_examples, skip),
            "ood_eval_data": lambda: (
                load_rows(cfg.ood_eval_data, "test", cfg.eval_examples, skip) if cfg.ood_eval_data else DataRows("", [])
            ),
        }
        data = {}
        for setting, load in loaders.items():
            try:
                data[setting] = load()
            except RowError as error:
                raise ConfigError(f"{setting}: {error}") from error
        return data

    def _check_data(self) -> None:
        """Every row through ``Policy.check_example``: refused (ConfigError naming file:line) or skipped."""
        for setting, rows in self.data.items():
            try:
                rows.check(self.policy.check_example, self.cfg.skip_bad_rows)
            except RowError as error:
                raise ConfigError(f"{setting}: {error}") from error
        if not self.data["data"].good():
            raise ConfigError(
                f"data: every row of {self.cfg.data} is bad: " + "; ".join(list(self.data["data"].bad.values())[:3])
            )

    def skipped_rows(self) -> List[str]:
        """ "file:line: why" of every row skipped as bad (skip_bad_rows), in setting and source order."""
        return [why for rows in self.data.values() for _, why in sorted(rows.bad.items())]

    def _build_policy(self, resuming: bool) -> Policy:
        cfg = self.cfg
        if cfg.model:
            return load_policy(cfg.model, cfg, self.dist.device)
        if resuming:  # the run's own tokenizer; the weights come from the checkpoint
            return self._policy_with_tokenizer_of(self.run_dir)
        if cfg.init_from:  # another run's tokenizer and newest weights (e.g. the study's shared warm start)
            return self._initial_policy(cfg.init_from)
        examples = self.data["data"].good() + self.data["eval_data"].good()
        texts = [t for e in examples for t in (e.question, e.expert, e.answer)]
        return build_tiny_policy(cfg, texts + ["user\n", "assistant\n"], self.dist.device)

    def _policy_with_tokenizer_of(self, run_dir: str) -> Policy:
        from transformers import AutoTokenizer

        folder = os.path.join(run_dir, "tokenizer")
        if not os.path.isdir(folder):
            raise ConfigError(f"{run_dir}: no tokenizer folder {folder} (not a run folder of the tiny model)")
        return build_tiny_policy(self.cfg, [], self.dist.device, tokenizer=AutoTokenizer.from_pretrained(folder))

    def _initial_policy(self, init_from: str) -> Policy:
        """The tiny policy with ``init_from``'s tokenizer and the weights of its newest good checkpoint."""
        policy = self._policy_with_tokenizer_of(init_from)
        path, state = checkpoint.load_latest(init_from)  # ConfigError when it holds no good checkpoint
        try:
            policy.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ConfigError(
                f"init_from: {path} does not fit this model's flags (hidden size, layers, ...): "
                f"{str(error).splitlines()[0]}"
            ) from error
        return policy

    def _make_optimizer(self, phase: str):
        cfg = self.cfg
        lr = cfg.sft_lr if phase == "sft" else cfg.lr
        optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        warmup = max(cfg.warmup_steps, 1)  # linear warmup over warmup_steps optimizer steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))
        return optimizer, scheduler

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def index(self) -> int:
        """Monotonic step index over both phases (names the checkpoint files)."""
        return self.step if self.phase == "sft" else self.sft_total + self.step

    def save(self) -> None:
        """Checkpoint ``index`` (written by the main process; every process returns once it is on disk).

        A state holding NaN / inf is never written; a failed write (full disk) raises CheckpointError on
        every process, the older checkpoints intact."""
        rng = distributed.gather_objects(checkpoint.capture_rng(), self.dist)
        error = None
        if self.dist.is_main:
            state = {
                "format_version": checkpoint.FORMAT_VERSION,
                "model": self.policy.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "phase": self.phase,
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "rng": rng,
                "world_size": self.dist.world_size,
                "config": self.cfg.to_dict(),
                "data": {
                    "rows": len(self.train_rows.rows),
                    "digests": torch.tensor(self.train_rows.digests(), dtype=torch.int64),
                },
            }
            poisoned = nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
            try:
                if poisoned:
                    raise checkpoint.CheckpointError(
                        f"refusing to write checkpoint {self.index}: non-finite values "
                        f"in {poisoned[:3]}; the older checkpoints are intact"
                    )
                checkpoint.save_checkpoint(self.run_dir, self.index, state, self.cfg.keep_checkpoints)
            except checkpoint.CheckpointError as failure:
                error = str(failure)
        # the broadcast also makes every process wait (and not exit) while the checkpoint is being written
        error = distributed.broadcast_object(error, self.dist)
        if error is not None:
            raise checkpoint.CheckpointError(error)
        self.saved_index = self.index

    def _check_resumed_data(self, saved: dict) -> None:
        """The training data now against the run's: same row count (the prompt order depends on it), and a
        warning naming the rows whose content changed (a corrected file is fine to resume with)."""
        digests = self.train_rows.digests()
        if int(saved["rows"]) != len(digests):
            raise ConfigError(
                f"--resume: data {self.cfg.data} has {len(digests)} rows, the run was trained on "
                f"{int(saved['rows'])}; rows added or removed would change the prompt order (correct "
                "rows in place, or skip bad ones with --skip-bad-rows)"
            )
        changed = changed_rows(saved["digests"].tolist(), digests)
        if changed:
            first = self.train_rows.rows[changed[0]]
            where = first.origin if first is not None else f"row {changed[0] + 1} (now skipped)"
            warnings.warn(
                f"--resume: {len(changed)} row(s) of data {self.cfg.data} differ from the run's "
                f"(first: {where}); continuing with the data as it is now",
                UserWarning,
                stacklevel=2,
            )

    def _restore(self, state: dict, path: str) -> None:
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"--resume: the run used {state['world_size']} processes, this one has {self.dist.world_size}"
            )
        if "data" in state:  # absent in the first checkpoint format
            self._check_resumed_data(state["data"])
        try:
            self.policy.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ConfigError(f"--resume: {path} does not fit the model: {str(error).splitlines()[0]}") from error
        self.phase, self.step = state["phase"], state["step"]
        self.optimizer, self.scheduler = self._make_optimizer(self.phase)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.restore_rng(state["rng"][self.dist.rank])
        self.saved_index = self.index
        if self.dist.is_main:
            truncate_run(self.run_dir, self.phase, self.step)

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        logger = RunLogger(
            self.run_dir, self.dist.is_main, cfg.tensorboard, cfg.progress, self.sft_total + cfg.max_steps, self.index
        )
        logger.message(f"calibrl: {cfg.algo} ({self.algorithm.summary}); run folder {self.run_dir}")
        shown = self.skipped_rows()
        if shown:
            logger.message(
                f"skipped {len(shown)} bad data row(s) (--skip-bad-rows): "
                + "; ".join(shown[:10])
                + (f"; ... {len(shown) - 10} more" if len(shown) > 10 else "")
            )
        start = time.time()
        try:
            while self.phase == "sft" and self.step < self.sft_total:
                self.step += 1
                logger.log(self.sft_step(), self.index)
                stopped_by = self._end_of_step(logger)
                if stopped_by:
                    return interrupted_exit_code(stopped_by)
            if self.phase == "sft":  # warm start done: fresh optimizer for RL, evaluate the starting point
                self.phase, self.step = "rl", 0
                self.optimizer, self.scheduler = self._make_optimizer("rl")
                logger.message(f"warm start done; RL for {cfg.max_steps} steps")
                self._log_eval({"phase": "rl", "step": 0}, logger)
            while self.step < cfg.max_steps:
                self.step += 1
                record = self.rl_step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    record.update(self._evaluate(logger))
                record["reward_errors"] = self._reward_errors(logger)
                logger.log(record, self.index)
                stopped_by = self._end_of_step(logger)
                if stopped_by:
                    return interrupted_exit_code(stopped_by)
            if self.saved_index != self.index:  # the last step's checkpoint is this state already
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
        """SIGINT / SIGTERM: finish the current step, save, stop. A second one stops at once."""
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = signum

    def _end_of_step(self, logger: RunLogger) -> int:
        """Checkpoint when due; after SIGINT / SIGTERM (on any process) save and return its number, else 0."""
        stop = int(
            distributed.all_reduce_max(torch.tensor([self.interrupted], device=self.dist.device), self.dist).item()
        )
        too_many_bad = self.guard.should_stop  # the same on every process (the flags are all-reduced)
        if stop or too_many_bad or self.step % self.cfg.save_every == 0:
            self.save()  # skipped updates never touched the weights: this is the last good state
        if too_many_bad:
            raise TooManyBadSteps(
                f"stopping: {self.guard.bad_in_row} steps in a row (max_bad_steps={self.cfg.max_bad_steps}) had a "
                f"non-finite loss or gradient, so their updates were skipped; the last good state is saved as "
                f"{self.phase} step {self.step} in {self.run_dir}. Look for rewards or advantages that overflow, or "
                "a learning rate that diverges, then continue with --resume"
            )
        if stop:
            logger.message(
                f"interrupted by {signal.Signals(stop).name}: saved {self.phase} step {self.step}; "
                f"continue with --resume {self.run_dir}"
            )
        return stop

    def _reward_errors(self, logger: RunLogger) -> int:
        """Samples the reward function raised on since the last call (all processes); the first is printed."""
        errors, first = self.scorer.take_errors()
        total = int(
            distributed.all_reduce_sum(torch.tensor([float(errors)], device=self.dist.device), self.dist).item()
        )
        if total:
            logger.message(
                f"reward function raised on {total} sample(s) up to {self.phase} step {self.step}; "
                f"each scored 0" + (f". First: {first}" if first else "")
            )
        return total

    def _evaluate(self, logger: RunLogger) -> Dict[str, float]:
        """Greedy and sampled held-out metrics; a few greedy answers go to samples.jsonl."""
        if not self.eval_examples:
            return {}
        results, samples = evaluate(
            self.policy,
            self.eval_examples,
            self.cfg.max_new_tokens,
            self.cfg.eval_batch_size,
            self.loss_cfg.temperature,
            self.dist,
            self.scorer,
            **self.eval_options,
        )
        logger.samples(self.phase, self.step, samples)
        if self.ood_examples:
            ood, _ = evaluate(
                self.policy,
                self.ood_examples,
                self.cfg.max_new_tokens,
                self.cfg.eval_batch_size,
                self.loss_cfg.temperature,
                self.dist,
                self.scorer,
                **self.eval_options,
            )
            results.update({f"ood_{key}": value for key, value in ood.items()})
        return results

    def _log_eval(self, record: dict, logger: RunLogger) -> None:
        record.update(self._evaluate(logger))
        logger.log(record, self.index, advance=False)
        if "eval_accuracy" in record:
            logger.message(
                f"held-out accuracy {record['eval_accuracy']:.3f} (greedy), "
                f"{record['eval_sampled_accuracy']:.3f} (sampled) at rl step 0"
            )

    # ------------------------------------------------------------------------------- one SFT step
    def _my_prompts(self, count: int, setting: str) -> List[int]:
        """This process's share of the next ``count`` prompts of the data order (contiguous block)."""
        if count % self.dist.world_size:  # check_processes refuses such settings at start-up
            raise ConfigError(
                f"{setting}: {count} prompts cannot be split evenly over {self.dist.world_size} processes"
            )
        indices = self.sampler.next_indices(count)
        share = count // self.dist.world_size
        return indices[self.dist.rank * share : (self.dist.rank + 1) * share]

    def sft_step(self) -> dict:
        """One supervised step on expert responses (token-mean NLL via linear_token_logprobs)."""
        started = time.time()
        reset_peak_memory(self.dist.device)
        examples = [self.train_examples[i] for i in self._my_prompts(self.cfg.sft_batch_size, "sft_batch_size")]
        prompts = self.policy.encode_prompts(examples)
        response_ids, response_mask = collate_responses(
            [self.policy.encode_response(e.expert) for e in examples], self.policy.pad_token_id
        )  # (R, T)
        inputs = sequence_inputs(prompts, torch.arange(len(examples)), response_ids, response_mask, self.dist.device)
        targets = response_targets(response_ids, response_mask).to(self.dist.device)  # (R, T)
        hidden, weight, bias = self.update_module(**inputs)  # (R, T, D), (V, D)
        loss, tokens = algorithms.sft_loss(hidden, weight, bias, targets)  # plain NLL at temperature 1
        loss.backward()
        grad_norm = self._optimizer_step(bool(torch.isfinite(loss)))
        totals = distributed.all_reduce_sum(
            torch.tensor([loss.item(), float(tokens)], device=self.dist.device), self.dist
        )
        elapsed = time.time() - started
        return {
            "phase": "sft",
            "step": self.step,
            "sft_loss": totals[0].item() / self.dist.world_size,
            "grad_norm": grad_norm,
            "lr": self.last_lr,
            "step_time": elapsed,
            "tokens_per_s": totals[1].item() / elapsed,
            "peak_memory_mb": peak_memory_mb(self.dist.device),
            "skipped_updates": self.guard.end_step(),
        }

    def _optimizer_step(self, loss_finite: bool = True) -> float:
        """Clip, step (unless the loss or the gradient is not finite on some process: then skipped and
        counted, weights and optimizer state untouched), zero the gradients; the gradient norm before clipping."""
        params = [p for p in self.policy.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (logged with the step)
        if self.guard.step_is_finite(loss_finite, grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -------------------------------------------------------------------------------- one RL step
    def rl_step(self) -> dict:
        """Rollouts -> rewards -> group statistics (all processes) -> baseline -> PPO updates."""
        cfg, dist = self.cfg, self.dist
        started = time.time()
        reset_peak_memory(dist.device)
        mine = self._my_prompts(cfg.prompts_per_step, "prompts_per_step")
        first_group = dist.rank * len(mine)  # group ids are positions in the step's global prompt list
        batch = collect_rollouts(
            self.policy,
            [self.train_examples[i] for i in mine],
            list(range(first_group, first_group + len(mine))),
            cfg.rollouts_per_prompt,
            cfg.max_new_tokens,
            self.loss_cfg.temperature,
            self.scorer,
            self.truncation_fails,
        )  # B = P_local * (n + 1)
        rollout_time = time.time() - started
        batch.old_logp, batch.token_entropy = old_logprobs(
            self.forward, batch, self.loss_cfg.temperature, cfg.micro_batch_rows, return_entropy=True
        )  # (B, T) each
        pass_rate, local_pass_rate, local_group_index = self._group_statistics(batch)
        # b (B, T) from the expert rows' old log-probs, before any expert row is dropped
        batch.baseline, batch.baseline_mask = algorithms.expert_baseline(
            batch.old_logp, batch.response_mask, batch.group_ids, batch.is_expert, self.loss_cfg
        )
        keep = algorithms.expert_keep_mask(
            local_group_index,
            batch.is_expert,
            local_pass_rate,
            cfg.mixup_policy,
            cfg.mix_ratio,
            cfg.pass_ratio_low,
            cfg.pass_ratio_high,
        )  # (B,)
        kept = batch.select(keep.nonzero().squeeze(1))
        every = cfg.diagnostics_every
        regime = (
            guide_regime(self.forward, kept, self.loss_cfg, cfg.micro_batch_rows, dist)
            if every and (self.step == 1 or self.step % every == 0)
            else {}
        )  # before the update: lp = lp_old
        update = self.update(kept)
        elapsed = time.time() - started
        record = {
            "phase": "rl",
            "step": self.step,
            **rollout_metrics(batch, pass_rate, keep, dist),
            **rollout_exploration(batch, self.policy.decode_response, dist),
            **regime,
            **update,
        }
        record.update(
            step_time=elapsed,
            rollout_time=rollout_time,
            lr=self.last_lr,
            tokens_per_s=record["sampled_tokens"] / elapsed,
            peak_memory_mb=peak_memory_mb(dist.device),
            skipped_updates=self.guard.end_step(),
        )
        return record

    def _group_statistics(self, batch: RolloutBatch):
        """Sets batch.advantages / batch.passed (B,) from the statistics of every process's groups.

        Returns the pass rate of every group (G,), of this process's groups (G_local,) and each row's
        local group index (B,).
        """
        dist = self.dist
        rewards = distributed.all_gather_rows(batch.rewards.to(dist.device), dist).cpu()  # (B_global,)
        group_ids = distributed.all_gather_rows(batch.group_ids.to(dist.device), dist).cpu()  # (B_global,)
        is_expert = distributed.all_gather_rows(batch.is_expert.to(dist.device, torch.uint8), dist).cpu().bool()
        stats = algorithms.group_statistics(rewards, group_ids, is_expert, self.loss_cfg)
        mine = slice(dist.rank * len(batch), (dist.rank + 1) * len(batch))
        batch.advantages, batch.passed = stats.advantages[mine].float(), stats.passed[mine]  # (B,) each
        local_groups, local_group_index = torch.unique(stats.group_index[mine], sorted=True, return_inverse=True)
        return stats.pass_rate, stats.pass_rate[local_groups], local_group_index


# ---------------------------------------------------------------------------------- entry point
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        cfg = parse_config(argv, parser).check_processes(distributed.env_world_size())
        dist = distributed.init(cfg.device)
    except ConfigError as error:
        _config_error(parser, error)
    try:
        try:
            trainer = Trainer(cfg, dist)
        except ConfigError as error:  # e.g. --resume with changed settings
            _config_error(parser, error)
        try:
            return trainer.run()
        except checkpoint.CheckpointError as error:  # e.g. a full disk
            return _run_error(error, FAILED_EXIT_CODE)
        except TooManyBadSteps as error:
            return _run_error(error, BAD_STEPS_EXIT_CODE)
        finally:
            trainer.close()
    finally:
        distributed.shutdown(dist)


def _run_error(error: Exception, code: int) -> int:
    """Print why the run stopped (main process) and return its exit status."""
    if distributed.env_rank() == 0:
        print(f"calibrl.train: error: {error}", file=sys.stderr, flush=True)
    return code


def _config_error(parser, error: ConfigError) -> None:
    """Exit with status 2 and an argparse-style message (printed by the main process only)."""
    if distributed.env_rank() != 0:
        sys.exit(2)
    parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
