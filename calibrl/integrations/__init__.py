"""The CalibRL loss inside established RL trainers.

* ``calibrl.integrations.trl``: ``CalibRLTrainer(trl.GRPOTrainer)`` and ``CalibRLGRPOConfig`` (extra ``trl``).
* ``calibrl.integrations.verl``: the loss, the baselines and the group-statistics advantage registered in
  verl's registries, plus the expert agent loop and trainer mode that carry expert rows (extra ``verl``).

Both build on ``calibrl.integrations._core`` (per-row fields of a hybrid batch and the per-batch loss,
callable with plain tensors). Submodules are imported on demand so that neither TRL nor verl is needed
to import this package.
"""

from ._core import ROW_FIELDS, calibrl_batch_loss, hybrid_batch_fields, needs_experts

__all__ = ["ROW_FIELDS", "calibrl_batch_loss", "hybrid_batch_fields", "needs_experts"]
