"""The study's outputs: one CSV row per run, a Markdown table of mean +- std over seeds, PNG curves.

Entropy is the mean token entropy of the on-policy rows at each RL step (the ``entropy`` metric of
``calibrl.train``), averaged over a window of ``WINDOW`` steps at the start, the middle and the end of RL.

Collapse: a run's entropy has collapsed when its end-window entropy is below ``COLLAPSE_RATIO`` (30%) of its
start-window entropy. Relative, because the starting entropy differs between algorithms (sft+grpo starts
after more supervised steps); 30% because a policy that keeps less than a third of its token-level
uncertainty within a few dozen RL steps samples nearly the same response for every rollout of a prompt,
which is when group advantages vanish and exploration stops (the failure CalibRL claims to prevent). The
CSV keeps the ratio itself so that any other threshold can be applied.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

from ..run_log import read_metrics
from .grid import SLOPE_ALIASES, Run

WINDOW = 5  # RL steps averaged for the start / middle / end entropy
COLLAPSE_RATIO = 0.3  # end / start entropy below this: collapsed
SPLITS = (("id", "eval_"), ("ood", "ood_eval_"))
DECODINGS = (("greedy", "accuracy"), ("sampled", "sampled_accuracy"))
ACCURACY_COLUMNS = tuple(
    f"{when}_{split}_{decoding}"
    for when in ("start", "final", "best")
    for split, _ in SPLITS
    for decoding, _ in DECODINGS
)
COLUMNS = (
    ("name", "section", "label", "seed")
    + ACCURACY_COLUMNS
    + (
        "entropy_start",
        "entropy_mid",
        "entropy_end",
        "entropy_ratio",
        "collapsed",
        "reward_end",
        "train_accuracy_end",
        "rl_steps",
    )
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_row(run: Run, run_dir: str) -> Dict[str, object]:
    """The CSV row of one finished RL run, from its metrics.jsonl."""
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "rl"]
    evals = [r for r in records if "eval_accuracy" in r]
    steps = [r for r in records if "entropy" in r]
    row: Dict[str, object] = {"name": run.name, "section": run.section, "label": run.label, "seed": run.seed}
    for split, prefix in SPLITS:
        for decoding, key in DECODINGS:
            series = [r.get(prefix + key, float("nan")) for r in evals]
            during = [v for r, v in zip(evals, series) if r["step"] > 0]
            row[f"start_{split}_{decoding}"] = series[0] if series else float("nan")
            row[f"final_{split}_{decoding}"] = series[-1] if series else float("nan")
            row[f"best_{split}_{decoding}"] = max(during) if during else float("nan")
    entropy = [r["entropy"] for r in steps]
    middle = max(len(entropy) // 2 - WINDOW // 2, 0)
    row["entropy_start"] = _mean(entropy[:WINDOW])
    row["entropy_mid"] = _mean(entropy[middle : middle + WINDOW])
    row["entropy_end"] = _mean(entropy[-WINDOW:])
    start = row["entropy_start"]
    row["entropy_ratio"] = row["entropy_end"] / start if start and start > 0 else float("nan")
    row["collapsed"] = int(row["entropy_ratio"] < COLLAPSE_RATIO)
    row["reward_end"] = _mean([r["reward"] for r in steps[-WINDOW:]])
    row["train_accuracy_end"] = _mean([r["accuracy"] for r in steps[-WINDOW:]])
    row["rl_steps"] = len(steps)
    return row


def write_csv(rows: Sequence[Dict[str, object]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = _mean(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


# (column header, row key) of the Markdown table
TABLE_COLUMNS = (
    ("ID sampled", "final_id_sampled"),
    ("ID greedy", "final_id_greedy"),
    ("OOD sampled", "final_ood_sampled"),
    ("OOD greedy", "final_ood_greedy"),
    ("best ID sampled", "best_id_sampled"),
    ("best OOD sampled", "best_ood_sampled"),
    ("entropy start", "entropy_start"),
    ("entropy mid", "entropy_mid"),
    ("entropy end", "entropy_end"),
    ("train reward end", "reward_end"),
)
SECTION_TITLES = {
    "main": "Algorithms (all from the same answer-only warm start per seed)",
    "activation": "Activation ablation of the guide term (calibrl; leaky_relu 0.5 is the calibrl row)",
    "slope": "Slope ablation of leaky_relu (calibrl; slope 0 is the relu run, 0.5 the calibrl run)",
    "baseline": "Expert-baseline variants (calibrl; position is the calibrl row)",
}


def section_groups(rows: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, List[Dict[str, object]]]]:
    """{section: {label: rows over seeds}}, with the reference rows the ablations share with the main runs."""
    by_label: Dict[str, List[Dict[str, object]]] = {}
    sections: Dict[str, Dict[str, List[Dict[str, object]]]] = {}
    for row in rows:
        by_label.setdefault(str(row["name"]).rsplit("-seed", 1)[0], []).append(row)
        sections.setdefault(str(row["section"]), {}).setdefault(str(row["label"]), []).append(row)
    references = {"activation": ("leaky_relu 0.5", "calibrl"), "baseline": ("position (default)", "calibrl")}
    for section, (label, key) in references.items():
        if section in sections and key in by_label:
            sections[section] = {label: by_label[key], **sections[section]}
    if "slope" in sections:
        for slope, key in SLOPE_ALIASES.items():
            if key in by_label:
                sections["slope"][f"slope {slope:g}"] = by_label[key]
        sections["slope"] = dict(sorted(sections["slope"].items(), key=lambda item: float(item[0].split()[1])))
    return sections


def _paired_differences(
    members: Sequence[Dict[str, object]], reference: Dict[int, Dict[str, object]], key: str
) -> List[float]:
    """``key`` of each member minus that of the reference run of the same seed (same warm start and prompts)."""
    return [float(m[key]) - float(reference[int(m["seed"])][key]) for m in members if int(m["seed"]) in reference]


START_COLUMNS = (
    ("ID greedy", "start_id_greedy"),
    ("ID sampled", "start_id_sampled"),
    ("OOD greedy", "start_ood_greedy"),
    ("OOD sampled", "start_ood_sampled"),
    ("entropy (first 5 steps)", "entropy_start"),
)


def markdown_table(rows: Sequence[Dict[str, object]], header: str = "") -> str:
    lines = [header] if header else []
    main = section_groups(rows).get("main", {})
    if main:  # where RL starts: the warm start (every algorithm) and sft+grpo after its expert SFT
        lines += [
            "",
            "**Starting point (RL step 0)**",
            "",
            "| run | seeds | " + " | ".join(h for h, _ in START_COLUMNS) + " |",
            "|---|---|" + "---|" * len(START_COLUMNS),
        ]
        for label in [k for k in ("calibrl", "sft+grpo") if k in main]:
            members = main[label]
            name = "warm start (every algorithm but sft+grpo)" if label == "calibrl" else "sft+grpo after its SFT"
            cells = [_mean_std([float(m[key]) for m in members]) for _, key in START_COLUMNS]
            lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    grpo = {int(r["seed"]): r for r in rows if r["name"] == f"grpo-seed{r['seed']}"}
    for section, groups in section_groups(rows).items():
        lines += [
            "",
            f"**{SECTION_TITLES.get(section, section)}**",
            "",
            "| run | seeds | " + " | ".join(h for h, _ in TABLE_COLUMNS) + " | ID sampled - grpo (same seed) "
            "| collapsed |",
            "|---|---|" + "---|" * (len(TABLE_COLUMNS) + 1) + "---|",
        ]
        for label, members in groups.items():
            cells = [_mean_std([float(m[key]) for m in members]) for _, key in TABLE_COLUMNS]
            cells.append(_mean_std(_paired_differences(members, grpo, "final_id_sampled")))
            collapsed = sum(int(m["collapsed"]) for m in members)
            lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + f" | {collapsed}/{len(members)} |")
    return "\n".join(lines) + "\n"


def _series(run_dir: str, key: str, eval_only: bool) -> Dict[int, float]:
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "rl" and key in r]
    return {int(r["step"]): float(r[key]) for r in records if not eval_only or "eval_accuracy" in r}


PANELS = (
    ("eval_sampled_accuracy", "in-domain accuracy (1 sample, T=1)", True),
    ("ood_eval_sampled_accuracy", "out-of-domain accuracy (1 sample, T=1)", True),
    ("eval_accuracy", "in-domain accuracy (greedy)", True),
    ("ood_eval_accuracy", "out-of-domain accuracy (greedy)", True),
    ("entropy", "entropy of on-policy rows (nats/token, 5-step mean)", False),
)


def plot_section(
    groups: Dict[str, List[Dict[str, object]]], study_dir: str, title: str, path: str, panels: Sequence = PANELS
) -> None:
    """One figure: a panel per metric (five of (key, title, evaluation only)), a line per label (mean over
    seeds), shaded +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, grid = plt.subplots(2, 3, figsize=(13, 7))
    axes = list(grid.flat)  # five panels, the sixth holds the legend
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, members) in enumerate(groups.items()):
        color = colors[k % len(colors)]
        for ax, (key, panel_title, eval_only) in zip(axes, panels):
            series = [_series(os.path.join(study_dir, str(m["name"])), key, eval_only) for m in members]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[t] for t in steps] for s in series])  # (seeds, steps)
            if not eval_only:  # per-step training metric: moving mean over 5 steps
                kernel = np.ones(min(5, len(steps))) / min(5, len(steps))
                values = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
                steps = steps[len(steps) - values.shape[1] :]
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
            ax.plot(
                steps,
                mean,
                color=color,
                label=f"{label} (n={len(members)})",
                marker="o" if eval_only else None,
                markersize=3,
            )
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            ax.set_title(panel_title, fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=9, title="mean over seeds, shaded: ± 1 std")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_tables(results_dir: str, rows: Sequence, write_rows: Callable, table: str) -> Dict[str, str]:
    """``results.csv`` (``write_rows(rows, path)``) and ``results.md`` (the Markdown ``table``) in
    ``results_dir``; returns {"csv": path, "table": path}."""
    os.makedirs(results_dir, exist_ok=True)
    outputs = {"csv": os.path.join(results_dir, "results.csv"), "table": os.path.join(results_dir, "results.md")}
    write_rows(rows, outputs["csv"])
    with open(outputs["table"], "w", encoding="utf-8") as handle:
        handle.write(table)
    return outputs


def write_report(
    runs: Sequence[Run], study_dir: str, results_dir: Optional[str] = None, header: str = ""
) -> Dict[str, str]:
    """CSV, Markdown and PNGs of every finished RL run in ``runs``; returns {what: path}."""
    from .runner import is_done

    results_dir = results_dir or study_dir
    rows = [
        run_row(run, os.path.join(study_dir, run.name))
        for run in runs
        if run.section != "warmstart" and is_done(os.path.join(study_dir, run.name))
    ]
    outputs = save_tables(results_dir, rows, write_csv, markdown_table(rows, header))
    for section, groups in section_groups(rows).items():
        outputs[f"plot_{section}"] = os.path.join(results_dir, f"curves_{section}.png")
        plot_section(groups, study_dir, SECTION_TITLES.get(section, section), outputs[f"plot_{section}"])
    return outputs
