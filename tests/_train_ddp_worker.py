"""Run by test_train_ddp.py under ``torchrun``: every DDP case in one launch (one process group).

Usage: ``torchrun ... tests/_train_ddp_worker.py JOBS_JSON`` where JOBS_JSON is
``{"runs": [argv, ...], "gradient_checks": [{"out": path, "flags": [...], "drop": rank or null}, ...]}``.
- runs: ``python -m calibrl.train`` argument lists, with scripted rewards (_train_helpers.scripted_rewards);
  per run, this process's group statistics go to ``<out>/stats-rank<R>.json``, the number of rows of each
  of its PPO updates to ``<out>/update-rows-rank<R>.json`` and its exit code to ``<out>/exit-rank<R>.json``
  (one line per run);
- gradient_checks: ``_train_helpers.update_gradients``; process 0 saves them to ``<out>/gradients.pt``.
Starting a launch costs much more than a quick run, hence all cases in one.
"""

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as torch_dist
from _train_helpers import scripted_rewards, update_gradients

from calibrl import distributed, train, update


def run_trainer(argv, update_rows):
    out = argv[argv.index("--out") + 1]
    update_rows.clear()
    with scripted_rewards([]) as log:
        code = train.main(argv)
    rank = distributed.env_rank()
    for name, value in (("stats", log), ("update-rows", update_rows), ("exit", code)):
        with open(os.path.join(out, f"{name}-rank{rank}.json"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(value) + "\n")


def main() -> int:
    faulthandler.enable()  # a native abort (SIGABRT, SIGSEGV) prints each thread's Python stack
    jobs = json.loads(sys.argv[1])
    distributed.shutdown = lambda info: None  # every run joins the same process group; destroyed at the end
    update_rows = []
    ppo_update = update.PPOUpdate.__call__

    def counted(self, batch):
        update_rows.append(len(batch))
        return ppo_update(self, batch)

    update.PPOUpdate.__call__ = counted
    try:
        for argv in jobs["runs"]:
            run_trainer(argv, update_rows)
        for check in jobs["gradient_checks"]:
            dist = distributed.init("cpu")
            gradients = update_gradients(check["flags"] + ["--out", check["out"]], dist, check["drop"])
            if dist.is_main:
                torch.save(gradients, os.path.join(check["out"], "gradients.pt"))
    finally:
        if torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Every result is on disk by now. Skip the interpreter's teardown: in about one full-suite run in four it
    # aborted here ("terminate called without an active exception", SIGABRT, after all runs and checks had
    # finished), from native threads this long-lived process accumulates over many trainer runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
