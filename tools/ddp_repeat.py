"""Repeat 2-process DDP quick runs and count how each launch ended (docs/reliability.md).

    python tools/ddp_repeat.py --runs 50 [--out bench/results/cpu-2core/ddp_repeat.txt]

Launches alternate a fresh ``torchrun --nproc_per_node 2 -m calibrl.train --quick`` run and a ``--resume`` of it
two steps further, with faulthandler on, so a native abort (exit -6 or 134) leaves every thread's stack in its log.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

from calibrl.distributed import torchrun_command

TRAIN = torchrun_command(2, "-m", "calibrl.train")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="launches (pairs of a fresh and a resumed run)")
    parser.add_argument("--out", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    codes = collections.Counter()
    failures = []
    started = time.time()
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="ddp-repeat-") as folder:
        for k in range(args.runs):
            run_dir = os.path.join(folder, f"run{k // 2}")
            steps = ["--max-steps", "2"] if k % 2 == 0 else ["--resume", run_dir, "--max-steps", "4"]
            command = TRAIN + ["--quick", "--no-tensorboard", "--out", run_dir, *steps]
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            codes[result.returncode] += 1
            if result.returncode != 0:
                tail = (result.stdout + result.stderr)[-3000:]
                failures.append(f"--- launch {k + 1} exited {result.returncode}; output tail:\n{tail}")
            print(f"launch {k + 1}/{args.runs}: exit {result.returncode}", flush=True)
    summary = "\n".join(
        [
            f"ddp_repeat: {args.runs} launches of 2 processes (gloo, CPU), alternating fresh and --resume runs, "
            f"in {time.time() - started:.0f} s",
            "exit codes: " + ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())),
            *failures,
        ]
    )
    print(summary)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(summary + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
