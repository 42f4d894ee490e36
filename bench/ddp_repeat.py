"""Repeat a 2-process DDP quick run N times and count how each launch ended.

    python bench/ddp_repeat.py --runs 50 [--out bench/results/cpu-2core/ddp_repeat.txt]

Each launch is ``torchrun --nproc_per_node 2 -m calibrl.train --quick ... --resume`` half the time (a fresh run
first, then a resumed one that extends it by two steps, the pattern that used to abort), with faulthandler on
(PYTHONFAULTHANDLER=1), so a native abort prints every thread's stack into the log. The summary counts exit
codes (a SIGABRT shows as -6 or 134) and keeps the tail of any failing launch's output.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

from calibrl.distributed import torchrun_command


def launch(out: str, extra) -> subprocess.CompletedProcess:
    command = torchrun_command(2, "-m", "calibrl.train", "--quick", "--no-tensorboard", "--out", out, *extra)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="launches (pairs of a fresh and a resumed run)")
    parser.add_argument("--out", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    codes = collections.Counter()
    failures = []
    started = time.time()
    folder = tempfile.mkdtemp(prefix="ddp-repeat-")
    try:
        for k in range(args.runs):
            run_dir = os.path.join(folder, f"run{k // 2}")
            extra = ["--max-steps", "2"] if k % 2 == 0 else ["--resume", run_dir, "--max-steps", "4"]
            result = launch(run_dir, extra)
            codes[result.returncode] += 1
            if result.returncode != 0:
                failures.append((k, result.returncode, (result.stdout + result.stderr)[-3000:]))
            print(f"launch {k + 1}/{args.runs}: exit {result.returncode}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [
        f"ddp_repeat: {args.runs} launches of 2 processes (gloo, CPU), alternating fresh and --resume runs, "
        f"in {time.time() - started:.0f} s",
        "exit codes: " + ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())),
    ]
    for k, code, tail in failures:
        lines += [f"--- launch {k + 1} exited {code}; output tail:", tail]
    summary = "\n".join(lines) + "\n"
    print(summary)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(summary)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
