"""``python -m calibrl.plot RUN_DIR [RUN_DIR ...]``: PNG curves of runs, overlaid for comparison.

One panel per metric over RL steps (the warm start's supervised loss gets its own panel when asked
for). Noisy per-step training metrics are drawn faint with an exponential moving average on top.
Runs are labelled by folder name (or ``--labels``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .run_log import read_metrics

DEFAULT_METRICS = (
    "reward",
    "accuracy",
    "eval_accuracy",
    "eval_sampled_accuracy",
    "entropy",
    "pg_loss",
    "guide_loss",
    "clipfrac",
    "ppo_kl",
    "response_length",
    "groups_all_fail",
    "groups_all_pass",
    "tokens_per_s",
)
SPARSE_METRICS = (
    "eval_accuracy",
    "eval_format",
    "eval_reward",
    "eval_response_length",
    "eval_sampled_accuracy",
    "eval_sampled_reward",
)  # not every step
TITLES = {
    "reward": "train reward (on-policy rows)",
    "accuracy": "train accuracy (on-policy rows)",
    "eval_accuracy": "held-out accuracy (greedy)",
    "eval_sampled_accuracy": "held-out accuracy (1 sample, T=1)",
    "eval_sampled_reward": "held-out reward (1 sample, T=1)",
    "entropy": "entropy of on-policy rows (nats/token)",
    "pg_loss": "policy-gradient loss",
    "guide_loss": "guide (calibration) loss",
    "clipfrac": "PPO clip fraction",
    "ppo_kl": "PPO KL (old - new)",
    "response_length": "response length (tokens)",
    "groups_all_fail": "groups with no correct rollout",
    "groups_all_pass": "groups with all rollouts correct",
    "tokens_per_s": "sampled tokens / s",
    "sft_loss": "warm-start NLL",
    "format": "format rate (on-policy rows)",
    "eval_format": "held-out format rate",
    "grad_norm": "gradient norm",
    "truncated": "responses cut at max length",
}


def series(records: Sequence[dict], metric: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of one metric; sft_loss over SFT steps, everything else over RL steps."""
    phase = "sft" if metric == "sft_loss" else "rl"
    points = [
        (r["step"], r[metric]) for r in records if r.get("phase") == phase and isinstance(r.get(metric), (int, float))
    ]
    return [p[0] for p in points], [float(p[1]) for p in points]


def ema(values: Sequence[float], smoothing: float) -> List[float]:
    """Bias-corrected exponential moving average (smoothing 0: the values themselves)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = smoothing * avg + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight)
    return out


def plot_runs(
    run_dirs: Sequence[str],
    out_path: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    labels: Optional[Sequence[str]] = None,
    smoothing: float = 0.8,
    title: Optional[str] = None,
) -> str:
    """Draw ``metrics`` of every run into one PNG grid at ``out_path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"labels: expected {len(run_dirs)} labels (one per run), got {len(labels)}")
    runs: Dict[str, list] = {label: read_metrics(d) for label, d in zip(labels, run_dirs)}
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        for k, (label, records) in enumerate(runs.items()):
            steps, values = series(records, metric)
            if not steps:
                continue
            color = colors[k % len(colors)]
            if metric in SPARSE_METRICS or smoothing <= 0:
                ax.plot(steps, values, marker="o", markersize=3, color=color, label=label)
            else:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(values, smoothing), color=color, label=label)
        ax.set_title(TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel("warm-start step" if metric == "sft_loss" else "RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    height = fig.get_size_inches()[1]
    top = 1 - (0.8 if title else 0.45) / height  # room above the panels for the title and the legend
    if title:
        fig.suptitle(title, y=1 - 0.05 / height, va="top")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            names,
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - (0.35 if title else 0.02) / height),
            ncol=min(len(names), 6),
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0, 1, top))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrl.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path; default RUN_DIR/curves.png (one run) or comparison.png")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    parser.add_argument("--smoothing", type=float, default=0.8, help="EMA smoothing of per-step metrics (0: none)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            parser.error(f"{run}: no metrics.jsonl (not a run folder?)")
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "comparison.png")
    labels = args.labels.split(",") if args.labels else None
    path = plot_runs(args.runs, out, [m for m in args.metrics.split(",") if m], labels, args.smoothing, args.title)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
