"""``python -m calibrl.study``: does CalibRL keep exploration alive? Every algorithm and ablation over seeds.

    python -m calibrl.study                      # the study ("v2"): main comparison, ~2 hours on 2 cores, runs/study-v2
    python -m calibrl.study --sections activation slope baseline   # its ablations (a second command)
    python -m calibrl.study --config v1          # the first study as it was run (about 50 minutes), runs/study
    python -m calibrl.study --report-only        # re-render results.csv / results.md / curves_*.png
    python -m calibrl.study --quick --out /tmp/s # plumbing check in well under a minute (tests)

Finished runs are skipped, so the same command continues an interrupted study. See ``tasks.py`` for the
task and the out-of-domain split, ``grid.py`` for the two configurations and their runs, ``report.py``
(v1) and ``report_v2.py`` (v2) for the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from . import report, report_v2
from .grid import SECTIONS, STUDIES, study_runs
from .runner import run_all
from .tasks import HELD_OUT, write_splits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m calibrl.study", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        default="v2",
        choices=tuple(STUDIES),
        help="v2: the study (default); v1: the first study as it was run (see calibrl/study/grid.py)",
    )
    parser.add_argument(
        "--out", default=None, help="study folder, one folder per run (default runs/study for v1, runs/study-v2 for v2)"
    )
    parser.add_argument("--results", default=None, help="where results.csv / .md / curves_*.png go (default: --out)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (default v1: 0 1 2, v2: 0 1 2 3 4, of which all but the main four "
        "configurations take the first 3; --quick: 0)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process (and core) each")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=None,
        choices=SECTIONS,
        help="which parts of the study to run (default v1: all, v2: main)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 RL steps: checks the plumbing only")
    parser.add_argument("--report-only", action="store_true", help="render the outputs of the finished runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _header(budget, seeds, wall_s: Optional[float]) -> str:
    if budget.version == "v2":
        return _header_v2(budget, seeds, wall_s)
    held_out = ", ".join(f"{color} {shape}" for shape, color in HELD_OUT)
    lines = [
        f"Study configuration: warm start {budget.warm_start_steps} answer-only supervised steps; "
        f"{budget.rl_steps} RL steps per run (sft+grpo: {budget.extra_sft_steps} supervised steps on the expert "
        f"traces first); evaluation every {budget.eval_every} RL steps on {budget.eval_examples} in-domain and "
        f"{budget.eval_examples} out-of-domain questions (held-out pairs: {held_out}); seeds {list(seeds)}.",
        "Values: mean ± standard deviation over seeds of the final evaluation (and of the best one during RL); "
        "entropy in nats/token over 5-step windows; collapsed: end-window entropy < 30% of the start window's.",
    ]
    if wall_s is not None:
        lines.append(f"Wall time of the run that produced this table: {wall_s / 60:.1f} minutes.")
    return "\n".join(lines)


def _header_v2(budget, seeds, wall_s: Optional[float]) -> str:
    held_out = ", ".join(f"{color} {shape}" for shape, color in HELD_OUT)
    lines = [
        f"Study configuration v2: warm start {budget.warm_start_steps} answer-only supervised steps, then a primer of "
        f"{budget.primer_steps} supervised steps on the expert traces of the warm start's images; {budget.rl_steps} "
        f"RL steps per run with {' '.join(budget.rl_flags)} for every algorithm (sft+grpo: {budget.extra_sft_steps} "
        f"supervised steps on the RL images' expert traces first); strict reward format; evaluation every "
        f"{budget.eval_every} RL steps on {budget.eval_examples} in-domain and {budget.eval_examples} out-of-domain "
        f"questions (held-out pairs: {held_out}), greedy and 8 samples at T = 1; seeds {list(seeds)} (main four "
        "configurations), the first 3 for the others.",
        f"Values: final evaluation (last RL step, no best-of); entropy windows of {report_v2.WINDOW} RL steps; "
        f"collapsed: per-response entropy or distinct answers at most {report_v2.COLLAPSE_RATIO:.0%} of the start; "
        f"format broken: final sampled ID format below {report_v2.FORMAT_BROKEN}.",
    ]
    if wall_s is not None:
        lines.append(f"Wall time of the runs that produced this table: {wall_s / 60:.1f} minutes.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("--jobs: expected an integer >= 1")
    full, quick = STUDIES[args.config]
    budget = quick if args.quick else full
    v2 = budget.version == "v2"
    if args.seeds is None:
        args.seeds = [0] if args.quick else ([0, 1, 2, 3, 4] if v2 else [0, 1, 2])
    if args.sections is None:
        args.sections = ["main"] if v2 else list(SECTIONS)
    if args.out is None:
        args.out = os.path.join("runs", "study-v2" if v2 else "study")
    data = write_splits(os.path.join(args.out, "data"))
    runs = study_runs(data, args.out, args.seeds, budget, args.sections)
    timing_path = os.path.join(args.out, "study_time.json")
    wall_s, failed = None, {}
    if not args.report_only:
        started = time.time()
        status = run_all(runs, args.out, args.jobs, args.progress)
        failed = {name: message for name, message in status.items() if message not in ("done", "skipped")}
        ran = sum(message == "done" for message in status.values())
        print(
            f"study: {ran} runs done, {len(status) - ran - len(failed)} skipped (finished before), "
            f"{len(failed)} failed",
            flush=True,
        )
        for message in failed.values():
            print(f"  FAILED {message}", file=sys.stderr)
        if ran:
            previous = json.load(open(timing_path)) if os.path.isfile(timing_path) else {"wall_s": 0.0}
            with open(timing_path, "w", encoding="utf-8") as handle:
                json.dump({"wall_s": previous["wall_s"] + time.time() - started}, handle)
    if os.path.isfile(timing_path):
        wall_s = json.load(open(timing_path))["wall_s"]
    write_report = report_v2.write_report if v2 else report.write_report
    outputs = write_report(runs, args.out, args.results, _header(budget, args.seeds, wall_s))
    for what, path in outputs.items():
        print(f"study: {what} -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
