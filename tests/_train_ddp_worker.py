"""Run by test_train_ddp.py under ``torchrun``: several trainer runs in one launch (one process group).

Usage: ``torchrun ... tests/_train_ddp_worker.py RUNS_JSON`` where RUNS_JSON is a list of argument lists
of ``python -m calibrl.train``. Rewards are scripted (_train_helpers.scripted_rewards); each run's
group statistics of this process go to ``<out>/stats-rank<R>.json``, the number of rows each PPO update
of this process got to ``<out>/update-rows-rank<R>.json`` and its exit code to ``<out>/exit-rank<R>.json``
(one line per run). Starting a launch costs more than a quick run, hence several per launch.
"""

import json
import os
import sys

import torch.distributed as torch_dist

from calibrl import distributed, train, update

from _train_helpers import scripted_rewards


def main() -> int:
    runs = json.loads(sys.argv[1])
    rank = distributed.env_rank()
    distributed.shutdown = lambda info: None  # every run joins the same process group; destroyed at the end
    update_rows = []
    ppo_update = update.PPOUpdate.__call__

    def counted(self, batch):
        update_rows.append(len(batch))
        return ppo_update(self, batch)

    update.PPOUpdate.__call__ = counted
    try:
        for argv in runs:
            out = argv[argv.index("--out") + 1]
            update_rows.clear()
            with scripted_rewards([]) as log:
                code = train.main(argv)
            for name, value in (("stats", log), ("update-rows", update_rows), ("exit", code)):
                with open(os.path.join(out, f"{name}-rank{rank}.json"), "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(value) + "\n")
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
