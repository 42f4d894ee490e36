"""Run outputs: metrics.jsonl (one JSON object per step), TensorBoard, the tqdm progress bar.

Records are ``{"phase": "sft"|"rl", "step": k, <metric>: value, ...}``. Lists (the group pass-rate
histogram) go to TensorBoard as histograms. Only the main process writes.

JSONL files are appended one whole line per ``write`` system call (``O_APPEND``), so a crash never
interleaves records; a short write (a full disk) can still leave a torn last line, which the readers
drop with a warning (``--resume`` rewrites the file without it). A torn line elsewhere is an error
naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import resource
import warnings
from typing import Any, Dict, Iterable, List

import torch

from . import checkpoint, distributed
from .config import ConfigError

PHASES = ("sft", "rl")
BAR_KEYS = (
    ("reward", "reward"),
    ("accuracy", "acc"),
    ("entropy", "ent"),
    ("eval_accuracy", "eval"),
    ("sft_loss", "nll"),
)


RECORD_FILES = ("metrics.jsonl", "samples.jsonl")  # per-step JSONL files of a run


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, "metrics.jsonl")


class TornLineWarning(UserWarning):
    """The last line of a JSONL run file was cut short (a full disk or a crash mid-write) and was dropped."""


def read_records(path: str) -> List[Dict[str, Any]]:
    """The records of a JSONL run file; a torn last line is dropped with a warning, any other bad line raises
    ValueError naming the file and line."""
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            if line_no == len(lines):  # no newline after it: the write was cut short
                warnings.warn(
                    f"{path}:{line_no}: dropping a torn last line ({len(line)} bytes, {error})",
                    TornLineWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{line_no}: not a JSON record ({error})") from error
    return records


def append_line(path: str, record: Dict[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single write (line-atomic; see the module docstring)."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (is the disk full?)")
    finally:
        os.close(fd)


def read_metrics(run_dir: str) -> list:
    """Every record of a run's metrics.jsonl, in file order."""
    return read_records(metrics_path(run_dir))


def _position(record: Dict[str, Any]):
    return PHASES.index(record["phase"]), record["step"]


def truncate_records(path: str, phase: str, step: int) -> None:
    """Drop the records of a JSONL run file after (phase, step): a resumed run rewrites what followed."""
    if not os.path.exists(path):
        return
    records = read_records(path)
    keep = [r for r in records if _position(r) <= (PHASES.index(phase), step)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def start_run_dir(run_dir: str, config: Dict[str, Any], tokenizer=None) -> None:
    """Prepare a new run's folder: config.json and the built-in model's tokenizer; refuse one holding a run."""
    if checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            f"out: {run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    os.makedirs(run_dir, exist_ok=True)
    for name in RECORD_FILES:  # left over from a run that never reached its first checkpoint
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(run_dir, "tokenizer"))


def truncate_run(run_dir: str, phase: str, step: int) -> None:
    """Drop the JSONL records a resumed run (continuing after ``phase`` ``step``) writes again."""
    for name in RECORD_FILES:
        truncate_records(os.path.join(run_dir, name), phase, step)


class RunLogger:
    """Writes every step's record; a no-op except on the main process.

    ``done_steps`` is the global step a resumed run continues after: TensorBoard events written past it
    by the interrupted run are purged, since the resumed run writes those steps again.
    """

    def __init__(
        self, run_dir: str, enabled: bool, tensorboard: bool, progress: bool, total_steps: int, done_steps: int
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge_step = done_steps + 1 if done_steps else None
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                self.writer = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True)

    def log(self, record: Dict[str, Any], global_step: int, advance: bool = True) -> None:
        """Write one record; ``advance`` moves the progress bar (False for the evaluation-only record)."""
        if not self.enabled:
            return
        append_line(metrics_path(self.run_dir), record)
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

    def samples(self, phase: str, step: int, samples: list) -> None:
        """Append an evaluation's shown answers to samples.jsonl."""
        if self.enabled:
            append_line(os.path.join(self.run_dir, "samples.jsonl"), {"phase": phase, "step": step, "samples": samples})

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


_CLEAR_REFS = "/proc/self/clear_refs"  # Linux: writing "5" resets VmHWM (peak RSS) to the current RSS


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (called at the start of every step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: peak_memory_mb reports the process's peak so far
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: GPU memory allocated on CUDA; on CPU the resident set's
    high-water mark (Linux VmHWM), or where that cannot be reset, the process's peak since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rollout_metrics(batch, pass_rate: torch.Tensor, keep: torch.Tensor, dist: distributed.DistInfo) -> Dict[str, Any]:
    """Reward / accuracy / format / length of the on-policy rows of every process, and group pass rates.

    batch: the step's RolloutBatch (B rows); pass_rate (G_global,) per group; keep (B,) bool rows kept.
    """
    on = ~batch.is_expert  # (B,)
    lengths = batch.response_mask.sum(1)  # (B,)
    local = torch.stack(
        [
            batch.rewards[on].sum(),
            batch.accuracy[on].sum(),
            batch.format[on].sum(),
            lengths[on].sum(),
            batch.truncated[on].float().sum(),
            on.sum().float(),
            batch.rewards[~on].sum(),
            (~on).sum().float(),
            (keep & ~on).sum().float(),
        ]
    ).double()
    total = distributed.all_reduce_sum(local.to(dist.device), dist).cpu().tolist()
    rows, experts = total[5], max(total[7], 1.0)
    return {
        "reward": total[0] / rows,
        "accuracy": total[1] / rows,
        "format": total[2] / rows,
        "response_length": total[3] / rows,
        "truncated": total[4] / rows,
        "sampled_tokens": total[3],
        "expert_reward": total[6] / experts,
        "expert_rows_kept": total[8] / experts,
        "groups_all_pass": float((pass_rate == 1).float().mean()),
        "groups_all_fail": float((pass_rate == 0).float().mean()),
        "group_pass_rate": [round(float(p), 4) for p in pass_rate],  # (G_global,) the histogram's data
    }
