"""The study's plumbing (python -m calibrl.study --quick, v1 and v2): splits, runs, resume, CSV / table / plots,
paired statistics.

No research outcome is asserted here; the committed results come from the full study (README).
"""

import csv
import json
import os
import re

import pytest

from calibrl.study import paired as paired_stats
from calibrl.study import report, report_v2, tasks
from calibrl.study.__main__ import main as study_main
from calibrl.study.grid import FULL, FULL_V2, QUICK, QUICK_V2, Run, study_runs
from calibrl.study.runner import DONE_FILE, FAILED_FILE


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
    assert {
        "calibrl",
        "grpo",
        "sft+grpo",
        "luffy",
        "rlplus",
        "dapo",
        "relu",
        "tanh",
        "sigmoid",
        "huber",
        "none",
        "slope 0.25",
        "slope 1",
    } <= labels
    calibrl = next(r for r in rl if r.name == "calibrl-seed1")
    assert calibrl.depends_on == "warmstart-seed1" and "--init-from" in calibrl.flags
    assert calibrl.flags[calibrl.flags.index("--sft-steps") + 1] == "0"


def _record(step, entropy, **extra):
    return {"phase": "rl", "step": step, "entropy": entropy, "reward": 0.5, "accuracy": 0.4, **extra}


def test_run_row_windows_and_collapse(tmp_path):
    evals = {
        "eval_accuracy": 0.3,
        "eval_sampled_accuracy": 0.2,
        "ood_eval_accuracy": 0.1,
        "ood_eval_sampled_accuracy": 0.05,
    }
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
    assert study_main(["--config", "v1", "--quick", "--out", str(out), "--results", str(results), "--no-progress"]) == 0
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
    assert study_main(["--config", "v1", "--quick", "--out", str(out), "--results", str(results), "--no-progress"]) == 0
    assert f"1 runs done, {expected - 1} skipped" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == stamp
    commands = [line for line in (out / "grpo-seed0" / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1] and "--resume" not in commands[0]


# ------------------------------------------------------------------------------------------ v2
def _data():
    return {k: f"{k}.jsonl" for k in ("warmstart", "warmstart_traces", "rl", "eval_id", "eval_ood")}


def _flag(run, name):
    return run.flags[run.flags.index(name) + 1]


def test_v1_configuration_is_the_first_study():
    runs = study_runs(_data(), "study", [0, 1, 2], FULL)
    assert not any(r.name.startswith("primer") for r in runs)
    for run in runs:  # the defaults of calibrl.train when the first study ran
        assert _flag(run, "--reward-format") == "authors" and _flag(run, "--eval-samples") == "1"
        assert "--lr" not in run.flags and "--eval-metrics" not in run.flags
    assert _flag(next(r for r in runs if r.name == "grpo-seed2"), "--max-steps") == "60"


def test_v2_grid_seeds_primer_and_one_learning_rate():
    runs = study_runs(_data(), "study", [0, 1, 2, 3, 4], FULL_V2, ["main"])
    warm = [r for r in runs if r.name.startswith("warmstart")]
    primers = [r for r in runs if r.name.startswith("primer")]
    rl = [r for r in runs if r.section != "warmstart"]
    assert len(warm) == len(primers) == 5 and runs[:10] == warm + primers  # scheduled before the RL runs
    assert all(
        p.depends_on == f"warmstart-seed{p.seed}"
        and _flag(p, "--data") == "warmstart_traces.jsonl"
        and _flag(p, "--sft-steps") == str(FULL_V2.primer_steps)
        for p in primers
    )
    seeds = {}
    for run in rl:
        seeds.setdefault(run.label, set()).add(run.seed)
        assert run.depends_on == f"primer-seed{run.seed}"
        assert _flag(run, "--init-from") == f"study/primer-seed{run.seed}"
        assert _flag(run, "--reward-format") == "strict" and _flag(run, "--eval-samples") == "8"
        assert _flag(run, "--eval-metrics") == "calibrl.study.tasks:attribute_scores"
        assert _flag(run, "--lr") == _flag(rl[0], "--lr")  # one learning rate for every algorithm
    assert {label: len(s) for label, s in seeds.items()} == {
        "calibrl": 5,
        "grpo": 5,
        "sft+grpo": 5,
        "none (no guide)": 5,
        "luffy": 3,
        "rlplus": 3,
        "dapo": 3,
    }
    none = next(r for r in rl if r.label == "none (no guide)")
    assert _flag(none, "--algo") == "calibrl" and _flag(none, "--activation") == "none"
    ablations = study_runs(_data(), "study", [0, 1, 2, 3, 4], FULL_V2, ["activation", "slope", "baseline"])
    labels = {r.label for r in ablations if r.section != "warmstart"}
    assert labels == {
        "relu",
        "tanh",
        "sigmoid",
        "huber",
        "slope 0.25",
        "slope 1",
        "sequence-mean baseline",
        "mask beyond expert length",
    }
    assert {r.seed for r in ablations if r.section != "warmstart"} == {0, 1, 2}


def test_attribute_scores_read_the_strict_answer():
    good = "<think>i see a red circle.</think><answer>red circle</answer>"
    assert tasks.attribute_scores(good, "red circle") == {"color": 1.0, "shape": 1.0}
    assert tasks.attribute_scores(good.replace("red circle</answer>", "teal circle</answer>"), "red circle") == {
        "color": 0.0,
        "shape": 1.0,
    }
    assert tasks.attribute_scores("<think>t</think><answer>red blue circle</answer>", "red circle")["color"] == 0.0
    assert tasks.attribute_scores("<answer>red circle</answer>", "red circle") == {"color": 0.0, "shape": 0.0}
    traces = tasks.study_splits()["warmstart_traces"]
    warm_images = {e.image for e in tasks.study_splits()["warmstart"]}
    assert {e.image for e in traces} == warm_images and all(e.expert.startswith("<think>i see a ") for e in traces)


def test_t_quantiles_and_paired_intervals():
    assert [round(paired_stats.t_quantile(0.975, df), 3) for df in (1, 2, 4, 9, 30)] == [
        12.706,
        4.303,
        2.776,
        2.262,
        2.042,
    ]  # the published Student-t table
    result = paired_stats.paired([0.016, 0.005, 0.042])  # the first study's calibrl - grpo (3 seeds)
    assert result.mean == pytest.approx(0.021) and (result.positive, result.negative) == (3, 0)
    assert result.low < 0 < result.high and result.excludes_zero() is False  # t = 1.9, df 2: not significant
    assert result.cell() == "+0.021 [-0.026, +0.068] 3+/0-"
    assert paired_stats.paired([0.1]).cell() == "+0.100 1+/0-" and paired_stats.paired([]).cell() == "-"
    assert paired_stats.paired([0.1, 0.12, 0.09, 0.11, 0.1]).excludes_zero() is True


def _write_run(folder, accuracy, entropy_end, distinct_end, format_end=1.0, regime=True):
    folder.mkdir(parents=True)
    records = [
        {
            "phase": "rl",
            "step": 0,
            "eval_accuracy": 0.2,
            "eval_sampled_accuracy": 0.2,
            "eval_sampled_format": 1.0,
            "eval_distinct_answers": 4.0,
            "ood_eval_sampled_color": 0.3,
        }
    ]
    for step in range(1, 21):
        record = {
            "phase": "rl",
            "step": step,
            "entropy": 0.5,
            "reward": 0.5,
            "format": 1.0,
            "response_entropy": 10.0 if step <= 10 else entropy_end,
            "response_length": 7.0,
        }
        if regime and step % 5 == 0:
            record.update(guide_z_pos_passed=0.25, guide_z_neg_passed=0.75, guide_grad_ratio=0.1, guide_grad_cos=0.9)
        if step == 20:
            record.update(
                eval_accuracy=accuracy,
                eval_sampled_accuracy=accuracy,
                eval_sampled_format=format_end,
                eval_distinct_answers=distinct_end,
                ood_eval_sampled_color=0.4,
            )
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / DONE_FILE).write_text("{}")


def test_v2_report_pairs_by_seed_and_counts_failed_runs(tmp_path):
    runs = [
        Run(f"{key}-seed{s}", "main", label, s, ())
        for key, label in (("calibrl", "calibrl"), ("grpo", "grpo"))
        for s in range(3)
    ]
    for s, (mine, theirs) in enumerate(((0.5, 0.4), (0.45, 0.4), (0.6, 0.4))):
        _write_run(tmp_path / f"grpo-seed{s}", theirs, entropy_end=7.0, distinct_end=1.5, regime=False)
        if s < 2:
            _write_run(
                tmp_path / f"calibrl-seed{s}",
                mine,
                entropy_end=8.0,
                distinct_end=3.0,
                format_end=0.2 if s == 1 else 1.0,
            )
    (tmp_path / "calibrl-seed2").mkdir()
    (tmp_path / "calibrl-seed2" / FAILED_FILE).write_text(json.dumps({"name": "calibrl-seed2", "error": "exit 1"}))
    outputs = report_v2.write_report(runs, str(tmp_path), str(tmp_path / "out"))
    with open(outputs["csv"], newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert rows["calibrl-seed2"]["status"] == "failed" and rows["calibrl-seed0"]["status"] == "done"
    assert rows["calibrl-seed1"]["format_broken"] == "1" and rows["calibrl-seed0"]["format_broken"] == "0"
    assert float(rows["grpo-seed0"]["response_entropy_ratio"]) == pytest.approx(0.7)
    assert float(rows["grpo-seed0"]["distinct_ratio"]) == pytest.approx(1.5 / 4)
    assert rows["grpo-seed0"]["collapsed"] == "1" and rows["calibrl-seed0"]["collapsed"] == "0"  # distinct answers
    assert float(rows["calibrl-seed0"]["guide_z_pos_passed"]) == pytest.approx(0.25)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| calibrl | 2/3 | 1 / 1 |" in table  # finished / planned, format broken / no result
    # paired: +0.10 and +0.05 over the two seeds that finished (the failed one has no value to pair)
    assert paired_stats.paired([0.1, 0.05]).cell() in table
    assert "calibrl-seed2 (failed)" in table
    assert "| calibrl | 0.250 ± 0.000 | 0.750 ± 0.000 |" in table  # the guide regime table
    assert (tmp_path / "out" / "curves_main.png").stat().st_size > 10_000


def test_quick_v2_study_runs_the_primer_and_reports(tmp_path, capsys):
    out = tmp_path / "study"
    assert study_main(["--quick", "--out", str(out), "--no-progress"]) == 0
    assert f"{2 + len(QUICK_V2.only)} runs done, 0 skipped" in capsys.readouterr().out
    commands = (out / "calibrl-seed0" / "train.log").read_text().splitlines()[0]
    assert "primer-seed0" in commands and "--reward-format strict" in commands
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in rows) == ["calibrl-seed0", "grpo-seed0"]
    assert all(r["status"] == "done" and r["final_id_pass8"] != "" for r in rows)
    assert "difference to grpo of the same seed" in (out / "results.md").read_text()


def test_v2_report_keeps_earlier_rows_and_pairs_ablations_with_calibrl(tmp_path):
    main = [Run(f"{key}-seed{s}", "main", key, s, ()) for key in ("calibrl", "grpo") for s in range(2)]
    ablation = [Run(f"act-tanh-seed{s}", "activation", "tanh", s, ()) for s in range(2)]
    for s in range(2):
        _write_run(tmp_path / "first" / f"grpo-seed{s}", 0.4, entropy_end=7.0, distinct_end=1.5, regime=False)
        _write_run(tmp_path / "first" / f"calibrl-seed{s}", 0.5, entropy_end=8.0, distinct_end=3.0)
        _write_run(tmp_path / "second" / f"act-tanh-seed{s}", 0.3 + 0.1 * s, entropy_end=8.0, distinct_end=3.0)
    out = tmp_path / "out"
    report_v2.write_report(main, str(tmp_path / "first"), str(out))
    first_curves = (out / "curves_main.png").read_bytes()
    # the main runs' folders are not in the second study folder: their rows come from the earlier CSV
    outputs = report_v2.write_report(main + ablation, str(tmp_path / "second"), str(out))
    assert "plot_main" not in outputs and (out / "curves_main.png").read_bytes() == first_curves
    assert (out / "curves_activation.png").stat().st_size > 10_000
    with open(outputs["csv"], newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert all(rows[r.name]["status"] == "done" for r in main + ablation)
    table = (out / "results.md").read_text()
    assert "Rows taken from the earlier results.csv (run folders not present): calibrl-seed0" in table
    assert "difference to calibrl of the same seed" in table
    assert paired_stats.paired([0.3 - 0.5, 0.4 - 0.5]).cell() in table  # tanh - calibrl, by seed
    assert paired_stats.paired([0.3 - 0.4, 0.4 - 0.4]).cell() in table  # tanh - grpo, by seed


def test_readme_study_table_is_the_committed_results():
    """The README's study table quotes docs/study/v2/results.csv: means, seed counts and paired intervals."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = list(report_v2.earlier_rows(os.path.join(root, "docs", "study", "v2", "results.csv")).values())
    main = report_v2._groups([r for r in rows if r["section"] == "main"])["main"]
    grpo = {int(r["seed"]): r for r in main["grpo"]}
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    names = {"none (no guide)": "calibrl without its guide"}
    for label, members in main.items():
        line = next(x for x in readme.splitlines() if x.startswith(f"| {names.get(label, label)} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(len(members))
        assert cells[2] == str(sum(int(m["collapsed"]) for m in members))
        assert cells[3] == str(sum(int(m["format_broken"]) for m in members))
        # the CSV keeps 4 decimals, the tables 3: recomputed numbers agree to within a rounding step
        assert _numbers(cells[4]) == pytest.approx(
            _numbers(report._mean_std(report_v2._values(members, "final_id_sampled"))), abs=2e-3
        )
        assert _numbers(cells[5]) == pytest.approx(
            _numbers(report._mean_std(report_v2._values(members, "final_ood_color"))), abs=2e-3
        )
        if label != "grpo":
            differences = [m["final_id_sampled"] - grpo[int(m["seed"])]["final_id_sampled"] for m in members]
            assert _numbers(cells[7]) == pytest.approx(_numbers(paired_stats.paired(differences).cell()), abs=2e-3)


def _numbers(cell: str) -> list:
    """The numbers of a table cell ("0.081 ± 0.119", "-0.078 [-0.226, +0.070] 1+/3-"), sign counts included."""
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", cell)]
