"""The PPO update of one RL batch: epochs, mini-batches of groups, micro-batches, over every process.

Mini-batches are made of whole groups of the step's P groups (all processes): each epoch, every process
shuffles its own groups and deals them round-robin by their global position (rank * P_local + local
position) over the ``mini_batches`` mini-batches, so each mini-batch gets P / mini_batches groups (+-1)
spread over the processes. One optimizer step per mini-batch.

Under DDP every process must run the same number of forward/backward passes in a mini-batch (gradients
are all-reduced in the last one). So the number of micro-batches is agreed over processes (the largest
any process needs) and a process with fewer rows (it holds fewer groups of this mini-batch, or dropped
more expert rows) fills up with zero-weight passes on one of its rows: DDP's hooks fire and it adds
nothing to the gradient.

Each micro-batch's loss (aggregated over its own rows, as in verl) is weighted by its loss rows / the
mini-batch's loss rows over all processes (times the process count, which DDP's average divides out);
loss rows are the rows whose tokens enter the loss (on-policy rows, plus expert rows for losses that
keep them). So the gradient is the loss-row-weighted mean of the micro-batch losses whatever the number
of processes and micro-batches: exactly the whole mini-batch's gradient for the per-sequence
aggregations (seq-mean-*), and close to it for token-mean (micro-batches differ in tokens per row).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List

import torch

from calibrl_kernels import CalibRLConfig

from . import algorithms, distributed
from .config import TrainConfig
from .rollout import RolloutBatch


def minibatch_of_groups(num_local_groups: int, rank: int, mini_batches: int) -> torch.Tensor:
    """(G_local,) mini-batch index of each local group position (groups dealt round-robin by global position)."""
    global_position = rank * num_local_groups + torch.arange(num_local_groups)
    return global_position % mini_batches


def micro_batches_needed(rows: int, micro_batch_rows: int) -> int:
    """Forward/backward passes one process needs for ``rows`` rows (0 when it has none)."""
    if rows == 0:
        return 0
    return math.ceil(rows / micro_batch_rows) if micro_batch_rows else 1


class PPOUpdate:
    """Runs ``cfg.ppo_epochs`` x ``cfg.mini_batches`` optimizer steps on a scored RolloutBatch."""

    def __init__(
        self,
        module: torch.nn.Module,
        loss: CalibRLConfig,
        cfg: TrainConfig,
        dist: distributed.DistInfo,
        optimizer_step: Callable[[bool], float],
    ):
        self.module = module  # PolicyForward, DDP-wrapped under torchrun
        self.loss = loss
        self.cfg = cfg
        self.dist = dist
        # (loss finite) -> gradient norm: clips, steps unless the loss or gradient is not finite, zeroes the gradients
        self.optimizer_step = optimizer_step
        self.loss_finite = True
        # --compile: the loss's calibrl:: operators compose with torch.compile (no graph break); a micro-batch
        # of another (R, T) recompiles once, then torch.compile marks those sizes dynamic
        self.policy_loss = (
            torch.compile(algorithms.policy_loss, fullgraph=True) if cfg.compile else algorithms.policy_loss
        )

    def __call__(self, batch: RolloutBatch) -> Dict[str, float]:
        """Loss metrics (means over this step's micro-batches, then over processes) and the mean grad norm.

        batch: this process's kept rows, with old_logp, advantages, passed, baseline and baseline_mask set.
        """
        cfg, dist = self.cfg, self.dist
        groups = torch.unique(batch.group_ids)  # (G_local,)
        micro_metrics: List[Dict[str, float]] = []
        grad_norms: List[float] = []
        for _ in range(cfg.ppo_epochs):
            order = groups[torch.randperm(len(groups))]  # (G_local,)
            minibatch = minibatch_of_groups(len(order), dist.rank, cfg.mini_batches)  # (G_local,)
            rows = [
                torch.isin(batch.group_ids, order[minibatch == k]).nonzero().squeeze(1) for k in range(cfg.mini_batches)
            ]  # this process's rows of each mini-batch
            local = torch.tensor(
                [[self._loss_rows(batch, r), micro_batches_needed(len(r), cfg.micro_batch_rows)] for r in rows],
                dtype=torch.float64,
                device=dist.device,
            )  # (mini_batches, 2)
            total_loss_rows = distributed.all_reduce_sum(local[:, 0], dist).cpu()  # (mini_batches,)
            passes = distributed.all_reduce_max(local[:, 1], dist).cpu()  # (mini_batches,)
            for k in range(cfg.mini_batches):
                self.loss_finite = True  # cleared by a micro-batch whose loss is NaN / inf
                micro_metrics += self._accumulate(batch, rows[k], int(passes[k]), float(total_loss_rows[k]))
                grad_norms.append(self.optimizer_step(self.loss_finite))
        keys = sorted(micro_metrics[0])
        means = torch.tensor(
            [sum(m[key] for m in micro_metrics) / len(micro_metrics) for key in keys],
            dtype=torch.float64,
            device=dist.device,
        )
        means = distributed.all_reduce_sum(means, dist).cpu() / dist.world_size
        return {**dict(zip(keys, means.tolist())), "grad_norm": sum(grad_norms) / len(grad_norms)}

    def _loss_rows(self, batch: RolloutBatch, rows: torch.Tensor) -> int:
        """How many of ``rows`` (R,) enter the loss: on-policy rows, and expert rows if the loss keeps them."""
        return len(rows) if self.loss.keeps_expert_rows else int((~batch.is_expert[rows]).sum())

    def _accumulate(
        self, batch: RolloutBatch, rows: torch.Tensor, passes: int, total_loss_rows: float
    ) -> List[Dict[str, float]]:
        """Forward/backward ``passes`` micro-batches of ``rows`` (R,), gradients accumulated (not yet synced
        except in the last pass); zero-weight passes fill up when this process has fewer micro-batches.
        ``total_loss_rows``: loss rows of the whole mini-batch over all processes."""
        step = self.cfg.micro_batch_rows or max(len(rows), 1)
        chunks = [rows[start : start + step] for start in range(0, len(rows), step)]
        metrics = []
        for index in range(passes):
            real = index < len(chunks)
            micro_rows = chunks[index] if real else torch.zeros(1, dtype=torch.long)  # a stand-in row
            weight = self._loss_rows(batch, micro_rows) / total_loss_rows * self.dist.world_size if real else 0.0
            sync = index == passes - 1 or not self.dist.active
            with contextlib.nullcontext() if sync else self.module.no_sync():
                out = self._loss(batch.select(micro_rows))
                (out.loss * weight).backward()
            self.loss_finite &= bool(torch.isfinite(out.loss))
            if real:
                metrics.append(out.metrics())
        return metrics

    def _loss(self, micro: RolloutBatch):
        device = self.dist.device
        hidden, weight, bias = self.module(**micro.forward_inputs(device))  # (R, T, D), (V, D), (V,) or None
        return self.policy_loss(hidden, weight, bias, micro.targets().to(device), micro.loss_inputs(device), self.loss)
