"""The study's plumbing (python -m calibrl.study --quick): splits, runs, resume, CSV / table / plots.

No research outcome is asserted here; the committed results come from the full study (README).
"""

import csv
import json
import os

import pytest

from calibrl.study import report, tasks
from calibrl.study.__main__ import main as study_main
from calibrl.study.grid import FULL, QUICK, Run, study_runs
from calibrl.study.runner import DONE_FILE


def test_splits_are_disjoint_and_ood_is_held_out():
    splits = tasks.study_splits()
    held_out = {f"{color} {shape}" for shape, color in tasks.HELD_OUT}
    warm_images = {e.image for e in splits["warmstart"]}
    rl_images = {e.image for e in splits["rl"]}
    assert warm_images and rl_images and not warm_images & rl_images  # RL never sees a warm-start image
    # the warm start teaches answers only, never the expert traces
    assert all(e.expert == f"<think></think><answer>{e.answer}</answer>" for e in splits["warmstart"])
    assert not {e.answer for e in splits["warmstart"] + splits["rl"] + splits["eval_id"]} & held_out
    assert {e.answer for e in splits["eval_ood"]} == held_out
    assert len({e.answer for e in splits["rl"]}) == 24 - len(held_out)
    assert all(e.expert == f"<think>i see a {e.answer}.</think><answer>{e.answer}</answer>" for e in splits["rl"])
    assert not {e.image for e in splits["eval_id"] + splits["eval_ood"]} & (warm_images | rl_images)


def test_grid_has_every_algorithm_and_ablation_per_seed():
    data = {k: f"{k}.jsonl" for k in ("warmstart", "rl", "eval_id", "eval_ood")}
    runs = study_runs(data, "study", [0, 1, 2], FULL)
    rl = [r for r in runs if r.section != "warmstart"]
    assert [r.section for r in runs[:3]] == ["warmstart"] * 3  # warm starts are scheduled first
    assert len(rl) == 3 * 15
    labels = {r.label for r in rl}
    assert {"calibrl", "grpo", "sft+grpo", "luffy", "rlplus", "dapo", "relu", "tanh", "sigmoid", "huber", "none",
            "slope 0.25", "slope 1"} <= labels
    calibrl = next(r for r in rl if r.name == "calibrl-seed1")
    assert calibrl.depends_on == "warmstart-seed1" and "--init-from" in calibrl.flags
    assert calibrl.flags[calibrl.flags.index("--sft-steps") + 1] == "0"


def _record(step, entropy, **extra):
    return {"phase": "rl", "step": step, "entropy": entropy, "reward": 0.5, "accuracy": 0.4, **extra}


def test_run_row_windows_and_collapse(tmp_path):
    evals = {"eval_accuracy": 0.3, "eval_sampled_accuracy": 0.2, "ood_eval_accuracy": 0.1,
             "ood_eval_sampled_accuracy": 0.05}
    records = [{"phase": "sft", "step": 1, "sft_loss": 1.0}, {"phase": "rl", "step": 0, **evals}]
    entropies = [1.0] * 5 + [0.5] * 10 + [0.2] * 5  # start window 1.0, end window 0.2 -> ratio 0.2: collapsed
    for step, h in enumerate(entropies, start=1):
        extra = {**evals, "eval_sampled_accuracy": 0.2 + 0.01 * step} if step % 10 == 0 else {}
        records.append(_record(step, h, **extra))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = report.run_row(Run("x-seed0", "main", "x", 0, ()), str(tmp_path))
    assert row["entropy_start"] == pytest.approx(1.0) and row["entropy_end"] == pytest.approx(0.2)
    assert row["entropy_mid"] == pytest.approx(0.5)
    assert row["entropy_ratio"] == pytest.approx(0.2) and row["collapsed"] == 1
    assert row["start_id_sampled"] == pytest.approx(0.2) and row["final_id_sampled"] == pytest.approx(0.4)
    assert row["best_id_sampled"] == pytest.approx(0.4) and row["best_ood_greedy"] == pytest.approx(0.1)
    assert row["rl_steps"] == 20


def test_quick_study_writes_outputs_and_resume_skips_finished_runs(tmp_path, capsys):
    out, results = tmp_path / "study", tmp_path / "results"
    assert study_main(["--quick", "--out", str(out), "--results", str(results), "--no-progress"]) == 0
    first = capsys.readouterr().out
    expected = 1 + len(QUICK.only)  # one warm start and each configuration, one seed
    assert f"{expected} runs done, 0 skipped" in first
    with open(results / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in rows) == sorted(f"{key}-seed0" for key in QUICK.only)
    assert all(0.0 <= float(r["final_id_sampled"]) <= 1.0 and float(r["entropy_start"]) > 0 for r in rows)
    table = (results / "results.md").read_text()
    for title in report.SECTION_TITLES.values():
        assert title in table
    assert "| calibrl | 1 |" in table and "| slope 0.5 | 1 |" in table  # alias rows share the calibrl run
    for section in report.SECTION_TITLES:
        assert (results / f"curves_{section}.png").stat().st_size > 10_000
    done = out / "calibrl-seed0" / DONE_FILE
    stamp = done.stat().st_mtime_ns
    # a second call skips every finished run; a run whose marker is gone is continued with --resume
    os.remove(out / "grpo-seed0" / DONE_FILE)
    assert study_main(["--quick", "--out", str(out), "--results", str(results), "--no-progress"]) == 0
    assert f"1 runs done, {expected - 1} skipped" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == stamp
    commands = [line for line in (out / "grpo-seed0" / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1] and "--resume" not in commands[0]
