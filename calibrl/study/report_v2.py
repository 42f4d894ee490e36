"""The second study's outputs: one CSV row per planned run (failed ones included), Markdown tables of final
values, paired differences to GRPO of the same seed with 95% t intervals and sign counts, the guide
regime, and PNG curves.

Final values are those of the last evaluation, at the last RL step (no best-of). Training metrics
(per-response entropy, per-token entropy, response length, format) are averaged over ``WINDOW`` steps at
the start and at the end of RL.

A run **failed** when it crashed (no finished marker; no values) or broke its format (final sampled
in-domain format rate below ``FORMAT_BROKEN``): broken runs keep their values, which enter every mean
and paired difference like any other run, and both kinds are counted in the tables. A run's
response-level exploration **collapsed** when its end-window per-response entropy, or its final number
of distinct answers per in-domain question, is at most ``COLLAPSE_RATIO`` of the start value.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence

from ..diagnostics import Z_KEYS
from ..run_log import read_metrics
from .grid import Run
from .paired import paired
from .report import _mean, _mean_std, plot_section, save_tables
from .runner import failure_message, is_done

WINDOW = 10  # RL steps averaged at the start and the end of training metrics
COLLAPSE_RATIO = 0.5  # end / start at most this: response-level exploration collapsed
FORMAT_BROKEN = 0.5  # final sampled in-domain format rate below this: the run broke its format
REFERENCE = "grpo"  # paired differences are taken to this configuration of the same seed
ABLATION_REFERENCE = "calibrl"  # the ablation sections are also paired with the calibrl run of the same seed
SECTION_TITLES = {
    "main": "Algorithms (every run from its seed's warm start + primer; sft+grpo adds its SFT on the RL images)",
    "activation": "Activation ablation of the guide term (calibrl; leaky_relu 0.5 is the main table's calibrl row)",
    "slope": "Slope ablation of leaky_relu (calibrl; 0.5 is the calibrl row, 0 the relu row)",
    "baseline": "Expert-baseline variants (calibrl; position is the calibrl row)",
}

# (CSV name, metrics key) of the evaluation values kept at the start (RL step 0) and at the final step
EVALS = (
    ("id_sampled", "eval_sampled_accuracy"),
    ("id_greedy", "eval_accuracy"),
    ("id_pass8", "eval_pass_at_8"),
    ("id_distinct", "eval_distinct_answers"),
    ("id_format", "eval_sampled_format"),
    ("ood_sampled", "ood_eval_sampled_accuracy"),
    ("ood_greedy", "ood_eval_accuracy"),
    ("ood_pass8", "ood_eval_pass_at_8"),
    ("ood_color", "ood_eval_sampled_color"),
    ("ood_shape", "ood_eval_sampled_shape"),
    ("ood_distinct", "ood_eval_distinct_answers"),
)
TRAINING = (
    ("response_entropy", "response_entropy"),
    ("token_entropy", "entropy"),
    ("response_length", "response_length"),
    ("answer_entropy", "answer_entropy"),
    ("train_format", "format"),
)
REGIME = tuple(key for key in Z_KEYS if key != "guide_tokens") + ("guide_grad_ratio", "guide_grad_cos")
COLUMNS = (
    ("name", "section", "label", "seed", "status")
    + tuple(f"{when}_{name}" for when in ("start", "final") for name, _ in EVALS)
    + tuple(f"{name}_{when}" for name, _ in TRAINING for when in ("start", "end"))
    + ("response_entropy_ratio", "distinct_ratio", "collapsed", "format_broken", "rl_steps")
    + REGIME
)


def _nan_mean(values: Sequence[float]) -> float:
    return _mean([v for v in values if isinstance(v, (int, float)) and not math.isnan(v)])


def _ratio(end: float, start: float) -> float:
    return end / start if start and start > 0 and not math.isnan(end) else math.nan


def run_row(run: Run, run_dir: str) -> Dict[str, object]:
    """The CSV row of one planned RL run: values from its metrics.jsonl, status done / failed / missing."""
    row: Dict[str, object] = {"name": run.name, "section": run.section, "label": run.label, "seed": run.seed}
    done = is_done(run_dir)
    row["status"] = "done" if done else ("failed" if failure_message(run_dir) else "missing")
    records = [r for r in read_metrics(run_dir) if r.get("phase") == "rl"] if done else []
    evals = [r for r in records if "eval_accuracy" in r]
    steps = [r for r in records if "entropy" in r]
    for name, key in EVALS:
        row[f"start_{name}"] = evals[0].get(key, math.nan) if evals else math.nan
        row[f"final_{name}"] = evals[-1].get(key, math.nan) if evals else math.nan
    for name, key in TRAINING:
        row[f"{name}_start"] = _nan_mean([r.get(key, math.nan) for r in steps[:WINDOW]])
        row[f"{name}_end"] = _nan_mean([r.get(key, math.nan) for r in steps[-WINDOW:]])
    row["response_entropy_ratio"] = _ratio(row["response_entropy_end"], row["response_entropy_start"])
    row["distinct_ratio"] = _ratio(row["final_id_distinct"], row["start_id_distinct"])
    ratios = [v for v in (row["response_entropy_ratio"], row["distinct_ratio"]) if not math.isnan(v)]
    row["collapsed"] = int(any(v <= COLLAPSE_RATIO for v in ratios)) if done else ""
    row["format_broken"] = int(row["final_id_format"] < FORMAT_BROKEN) if done else ""
    row["rl_steps"] = len(steps)
    for key in REGIME:
        row[key] = _nan_mean([r[key] for r in steps if key in r])
    return row


INTEGER_COLUMNS = ("seed", "collapsed", "format_broken", "rl_steps")
TEXT_COLUMNS = ("name", "section", "label", "status")


def earlier_rows(path: str) -> Dict[str, Dict[str, object]]:
    """The finished rows of an earlier ``results.csv`` by run name, typed as ``run_row`` makes them ({} when
    there is no such file). The report falls back on them for runs whose folders are not here."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "done"]
    return {
        row["name"]: {
            k: (v if k in TEXT_COLUMNS else int(v) if k in INTEGER_COLUMNS else float(v)) for k, v in row.items()
        }
        for row in rows
    }


def write_csv(rows: Sequence[Dict[str, object]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def _groups(rows: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, List[Dict[str, object]]]]:
    """{section: {label: rows over seeds}} in the grid's order."""
    sections: Dict[str, Dict[str, List[Dict[str, object]]]] = {}
    for row in rows:
        sections.setdefault(str(row["section"]), {}).setdefault(str(row["label"]), []).append(row)
    return sections


def _values(members: Sequence[Dict[str, object]], key: str) -> List[float]:
    return [float(m[key]) for m in members if m["status"] == "done"]


def _start_end(members: Sequence[Dict[str, object]], start: str, end: str) -> str:
    a, b = _nan_mean(_values(members, start)), _nan_mean(_values(members, end))
    return "-" if math.isnan(a) else f"{a:.2f} -> {b:.2f}"


FINAL_COLUMNS = (
    ("ID sampled", "final_id_sampled"),
    ("ID pass@8", "final_id_pass8"),
    ("OOD pair", "final_ood_sampled"),
    ("OOD colour", "final_ood_color"),
    ("OOD shape", "final_ood_shape"),
)
# (header, CSV key) of the paired differences to grpo of the same seed
PAIRED_COLUMNS = (
    ("ID sampled", "final_id_sampled"),
    ("ID pass@8", "final_id_pass8"),
    ("OOD pair", "final_ood_sampled"),
    ("OOD colour", "final_ood_color"),
    ("OOD shape", "final_ood_shape"),
    ("resp. entropy end/start", "response_entropy_ratio"),
    ("distinct answers end", "final_id_distinct"),
)
REGIME_COLUMNS = (
    ("z>0 passed", "guide_z_pos_passed"),
    ("z<0 passed", "guide_z_neg_passed"),
    ("z>0 failed", "guide_z_pos_failed"),
    ("z<0 failed", "guide_z_neg_failed"),
    ("lp-b passed", "guide_gap_passed"),
    ("lp-b failed", "guide_gap_failed"),
    ("|g_guide|/|g_pg|", "guide_grad_ratio"),
    ("cos(g_guide, g_pg)", "guide_grad_cos"),
)


def _paired_cells(done: Sequence[Dict[str, object]], reference: Dict[int, Dict[str, object]]) -> List[str]:
    """One cell per paired column: the differences of ``done`` to the reference run of the same seed."""
    return [
        paired([float(m[k]) - float(reference[int(m["seed"])][k]) for m in done if int(m["seed"]) in reference]).cell()
        for _, k in PAIRED_COLUMNS
    ]


def _table(title: str, headers: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    return ["", f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cells) + " |" for cells in lines
    ]


def markdown_report(rows: Sequence[Dict[str, object]], header: str = "") -> str:
    lines = [header] if header else []
    groups = _groups(rows)
    references = {
        name: {
            int(r["seed"]): r for r in rows if r["label"] == name and r["section"] == "main" and r["status"] == "done"
        }
        for name in (REFERENCE, ABLATION_REFERENCE)
    }
    main = groups.get("main", {})
    starts = [
        ("RL start (every run but sft+grpo)", main.get("calibrl") or main.get(REFERENCE) or []),
        ("sft+grpo after its SFT", main.get("sft+grpo", [])),
    ]
    start_keys = (
        ("ID sampled", "start_id_sampled"),
        ("ID pass@8", "start_id_pass8"),
        ("ID distinct answers", "start_id_distinct"),
        ("OOD pair", "start_ood_sampled"),
        ("OOD colour", "start_ood_color"),
        ("OOD shape", "start_ood_shape"),
        ("resp. entropy (first steps)", "response_entropy_start"),
    )
    start_lines = [
        [name, str(len(_values(m, "start_id_sampled")))] + [_mean_std(_values(m, k)) for _, k in start_keys]
        for name, m in starts
        if m
    ]
    lines += _table(
        "Starting point (RL step 0; mean ± std over seeds)",
        ["start", "seeds"] + [h for h, _ in start_keys],
        start_lines,
    )
    for section, labels in groups.items():
        title = SECTION_TITLES.get(section, section)
        final_lines, paired_lines, regime_lines = [], {}, []
        for label, members in labels.items():
            done = [m for m in members if m["status"] == "done"]
            broken = sum(int(m["format_broken"] == 1) for m in done)
            crashed = len(members) - len(done)
            collapsed = sum(int(m["collapsed"] == 1) for m in done)
            counts = [f"{len(done)}/{len(members)}", f"{broken} / {crashed}", f"{collapsed}/{len(done)}"]
            final_lines.append(
                [label]
                + counts
                + [_mean_std(_values(members, k)) for _, k in FINAL_COLUMNS]
                + [
                    _start_end(members, "response_entropy_start", "response_entropy_end"),
                    _start_end(members, "start_id_distinct", "final_id_distinct"),
                ]
            )
            for name, by_seed in references.items():
                if label != name and (section != "main" or name == REFERENCE):
                    paired_lines.setdefault(name, []).append([label] + _paired_cells(done, by_seed))
            regime_lines.append([label] + [_mean_std(_values(members, k)) for _, k in REGIME_COLUMNS])
        lines += _table(
            f"{title}: final values (mean ± std over finished runs)",
            ["run", "finished", "failed: format broken / no result", "collapsed"]
            + [h for h, _ in FINAL_COLUMNS]
            + ["resp. entropy start -> end", "distinct answers start -> end"],
            final_lines,
        )
        for name, paired_rows in paired_lines.items():
            if references[name]:
                lines += _table(
                    f"{title}: difference to {name} of the same seed (mean [95% t interval] sign counts)",
                    ["run"] + [h for h, _ in PAIRED_COLUMNS],
                    paired_rows,
                )
        lines += _table(
            f"{title}: guide regime (means over each run's diagnostic steps, then over seeds)",
            ["run"] + [h for h, _ in REGIME_COLUMNS],
            regime_lines,
        )
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += [
            "",
            "Runs without results (counted as failed above): "
            + ", ".join(f"{r['name']} ({r['status']})" for r in failed)
            + ".",
        ]
    return "\n".join(lines) + "\n"


PANELS = (
    ("eval_sampled_accuracy", "in-domain accuracy (8 samples, T=1)", True),
    ("ood_eval_sampled_color", "out-of-domain colour accuracy (sampled)", True),
    ("ood_eval_sampled_shape", "out-of-domain shape accuracy (sampled)", True),
    ("response_entropy", "entropy per response (nats, 5-step mean)", False),
    ("eval_distinct_answers", "distinct answers per ID question (of 8)", True),
)


def write_report(
    runs: Sequence[Run], study_dir: str, results_dir: Optional[str] = None, header: str = ""
) -> Dict[str, str]:
    """CSV, Markdown and PNGs of every planned RL run in ``runs``; returns {what: path}.

    A run whose folder holds no finished run but which has a finished row in the ``results.csv`` already in
    ``results_dir`` keeps that row (the ablations can be rendered beside a main comparison whose run folders
    are gone); the table's header lists those runs. Curves are drawn from run folders only: a section
    without any keeps the PNG already there."""
    results_dir = results_dir or study_dir
    kept = earlier_rows(os.path.join(results_dir, "results.csv"))
    rows, reused = [], []
    for run in runs:
        if run.section == "warmstart":
            continue
        row = run_row(run, os.path.join(study_dir, run.name))
        if row["status"] != "done" and run.name in kept:
            row = {**kept[run.name], "name": run.name, "section": run.section, "label": run.label, "seed": run.seed}
            reused.append(run.name)
        rows.append(row)
    if reused:
        note = f"Rows taken from the earlier results.csv (run folders not present): {', '.join(reused)}."
        header = f"{header}\n{note}" if header else note
    outputs = save_tables(results_dir, rows, write_csv, markdown_report(rows, header))
    for section, labels in _groups(rows).items():
        drawn = {
            label: [m for m in members if is_done(os.path.join(study_dir, str(m["name"])))]
            for label, members in labels.items()
        }
        drawn = {label: members for label, members in drawn.items() if members}
        if drawn:
            outputs[f"plot_{section}"] = os.path.join(results_dir, f"curves_{section}.png")
            plot_section(drawn, study_dir, SECTION_TITLES.get(section, section), outputs[f"plot_{section}"], PANELS)
    return outputs
