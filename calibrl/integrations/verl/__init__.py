"""CalibRL inside verl 0.9 (tested against verl 0.9.1); the ``verl.plugins`` entry point.

Importing this package registers, when verl is importable, the policy losses and the advantage estimator
(``plugin``) and, when verl's v1 trainer stack (ray, TransferQueue) is importable too, the expert agent
loop and the ``calibrl_sync`` trainer mode (``trainer``). ``python -m calibrl.integrations.verl.main``
is verl's ``main_ppo`` with CalibRL's start-up checks first.

Imports run one way: ``trainer`` and ``main`` import ``plugin``; this package imports ``plugin`` and
``trainer``; nothing imports the package from inside it.
"""

from __future__ import annotations

import logging

from .plugin import (
    ADV_ESTIMATOR,
    AGENT_LOOP,
    POLICY_LOSSES,
    TRAINER_MODE,
    VERL_OWNED_FIELDS,
    calibrl_overrides,
    calibrl_ppo_loss,
    check_loss_settings,
    check_startup_config,
    clamped_ppo_kl,
    compute_calibrl_outcome_advantage,
    counted_rows,
    global_scale,
    hybrid_rows,
    loss_config,
    policy_loss,
    register,
    require_verl,
    startup_problems,
    transfer_queue_problem,
    uid_group_ids,
)

__all__ = [
    "ADV_ESTIMATOR",
    "AGENT_LOOP",
    "POLICY_LOSSES",
    "TRAINER_MODE",
    "VERL_OWNED_FIELDS",
    "calibrl_overrides",
    "calibrl_ppo_loss",
    "check_loss_settings",
    "check_startup_config",
    "clamped_ppo_kl",
    "compute_calibrl_outcome_advantage",
    "counted_rows",
    "global_scale",
    "hybrid_rows",
    "loss_config",
    "policy_loss",
    "register",
    "require_verl",
    "startup_problems",
    "transfer_queue_problem",
    "uid_group_ids",
]

logger = logging.getLogger(__name__)


def _register_on_import() -> None:
    if not register():
        return
    try:  # the agent loop and trainer mode need verl's v1 trainer stack (ray, TransferQueue, ...)
        from . import trainer  # noqa: F401
    except ImportError as error:
        logger.info("calibrl: verl trainer mode calibrl_sync not registered (%s)", error)


_register_on_import()
