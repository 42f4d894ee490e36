"""Run outputs: metrics.jsonl (one JSON object per step), TensorBoard, the tqdm progress bar.

Records are ``{"phase": "sft"|"rl", "step": k, <metric>: value, ...}``. Lists (the group pass-rate
histogram) go to TensorBoard as histograms. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import resource
from typing import Any, Dict, Iterable

import torch

from . import distributed

PHASES = ("sft", "rl")
BAR_KEYS = (("reward", "reward"), ("accuracy", "acc"), ("entropy", "ent"), ("eval_accuracy", "eval"), ("sft_loss", "nll"))


RECORD_FILES = ("metrics.jsonl", "samples.jsonl")  # per-step JSONL files of a run


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, "metrics.jsonl")


def read_metrics(run_dir: str) -> list:
    """Every record of a run's metrics.jsonl, in file order."""
    with open(metrics_path(run_dir), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _position(record: Dict[str, Any]):
    return PHASES.index(record["phase"]), record["step"]


def truncate_records(path: str, phase: str, step: int) -> None:
    """Drop the records of a JSONL run file after (phase, step): a resumed run rewrites what followed."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    keep = [r for r in records if _position(r) <= (PHASES.index(phase), step)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


class RunLogger:
    """Writes every step's record; a no-op except on the main process."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, progress: bool, total_steps: int, done_steps: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self._file = None
        if not enabled:
            return
        self._file = open(metrics_path(run_dir), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self.writer = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True)

    def log(self, record: Dict[str, Any], global_step: int, advance: bool = True) -> None:
        """Write one record; ``advance`` moves the progress bar (False for the evaluation-only record)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key in ("phase", "step"):
                    continue
                tag = f"{record['phase']}/{key}"
                if isinstance(value, (list, tuple)):
                    self._histogram(tag, value, global_step)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, global_step)
        if self.bar is not None:
            shown = {short: f"{record[key]:.3f}" for key, short in BAR_KEYS if isinstance(record.get(key), float)}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.set_description(record["phase"])
            self.bar.update(1 if advance else 0)

    def _histogram(self, tag: str, values: Iterable[float], step: int) -> None:
        import numpy as np

        self.writer.add_histogram(tag, np.asarray(list(values), dtype=np.float64), step)

    def message(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._file is not None:
            self._file.close()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rollout_metrics(batch, pass_rate: torch.Tensor, keep: torch.Tensor, dist: distributed.DistInfo) -> Dict[str, Any]:
    """Reward / accuracy / format / length of the on-policy rows of every process, and group pass rates.

    batch: the step's RolloutBatch (B rows); pass_rate (G_global,) per group; keep (B,) bool rows kept.
    """
    on = ~batch.is_expert  # (B,)
    lengths = batch.response_mask.sum(1)  # (B,)
    local = torch.stack([
        batch.rewards[on].sum(), batch.accuracy[on].sum(), batch.format[on].sum(), lengths[on].sum(),
        batch.truncated[on].float().sum(), on.sum().float(), batch.rewards[~on].sum(), (~on).sum().float(),
        (keep & ~on).sum().float(),
    ]).double()
    total = distributed.all_reduce_sum(local.to(dist.device), dist).cpu().tolist()
    rows, experts = total[5], max(total[7], 1.0)
    return {
        "reward": total[0] / rows, "accuracy": total[1] / rows, "format": total[2] / rows,
        "response_length": total[3] / rows, "truncated": total[4] / rows, "sampled_tokens": total[3],
        "expert_reward": total[6] / experts, "expert_rows_kept": total[8] / experts,
        "groups_all_pass": float((pass_rate == 1).float().mean()),
        "groups_all_fail": float((pass_rate == 0).float().mean()),
        "group_pass_rate": [round(float(p), 4) for p in pass_rate],  # (G_global,) the histogram's data
    }
