"""``python -m calibrl.integrations.verl.main [hydra overrides]``: verl's ``main_ppo`` with CalibRL's checks first.

Same configuration and overrides as ``python -m verl.trainer.main_ppo``. Before Ray starts it refuses, with a
ValueError naming the setting and the alternative, every setting in
``calibrl.integrations.verl.startup_problems`` and a TransferQueue with more storage units than the Ray
cluster can schedule (``verl.trainer.main_ppo`` would wait in ``tq.init`` forever). Running verl's own entry
point works too; the CalibRL settings are then checked when the trainer is built, after the TransferQueue.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import hydra

from .plugin import _select, check_startup_config, require_verl, transfer_queue_problem


def ray_cpus(config: Any) -> Optional[float]:
    """Logical CPUs of the Ray cluster verl will use: ``ray_kwargs.ray_init.num_cpus``, else those of the
    running cluster named by ``RAY_ADDRESS`` (connecting briefly), else this machine's (a local Ray)."""
    configured = _select(config, "ray_kwargs.ray_init.num_cpus")
    if configured is not None:
        return float(configured)
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        try:
            return float(ray.cluster_resources().get("CPU", 0))
        finally:
            ray.shutdown()
    from ray._private.utils import get_num_cpus  # what a local ray.init() registers

    return float(get_num_cpus())


def check_before_ray(config: Any) -> None:
    """Every check that must pass before verl starts Ray, the TransferQueue and the workers."""
    check_startup_config(config)
    problem = transfer_queue_problem(config, ray_cpus(config))
    if problem:
        raise ValueError(problem)


@hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
def main(config):
    require_verl()
    from verl.trainer import main_ppo

    check_before_ray(config)
    main_ppo.main.__wrapped__(config)  # verl's hydra task function itself


if __name__ == "__main__":
    main()
