"""Shared helpers of the trainer tests: in-process quick runs and metric comparison."""

import json
import math
import os

from calibrl.logging import read_metrics
from calibrl.train import main

TIMING_KEYS = {"step_time", "rollout_time", "tokens_per_s", "peak_memory_mb"}  # wall-clock dependent


def quick_run(out, *flags):
    """Run ``python -m calibrl.train --quick --out OUT FLAGS`` in this process; returns the exit code."""
    return main(["--quick", "--out", str(out), "--no-tensorboard", *map(str, flags)])


def comparable(records):
    """Records without the wall-clock metrics, keyed by (phase, step)."""
    return {(r["phase"], r["step"]): {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def metrics(run_dir):
    return read_metrics(str(run_dir))


def all_finite(record):
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def saved_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as handle:
        return json.load(handle)
