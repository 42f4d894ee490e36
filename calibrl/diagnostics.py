"""Is the guide term engaged? Where rollout tokens sit against the expert baseline, and what the guide adds.

Logged every ``diagnostics_every`` RL steps, on the step's kept rows before its update (so the current
log-probs are the old ones, lp = lp_old, and every PPO ratio is 1):

- regime of the guided tokens (every algorithm, so a GRPO run shows where a guide would act): guided
  tokens are the response tokens of on-policy rows whose guide weight w = |A| is non-zero (every row when
  the loss does not weight by |A|), within the expert's length under ``mask_beyond_expert``. With
  ``z = -s (lp - b)`` (s = +1 on passed rows, -1 on failed ones; b the expert baseline):
  ``guide_z_pos_passed`` / ``guide_z_neg_passed``: share of a passed row's guided tokens with z > 0
  (below the baseline: pushed up at full strength) / z < 0 (above it: pushed on at the slope alpha);
  ``guide_z_pos_failed`` / ``guide_z_neg_failed`` likewise on failed rows (z > 0: above the baseline,
  pushed down at full strength); ``guide_gap_passed`` / ``guide_gap_failed``: mean lp - b;
  ``guide_tokens``: guided tokens over all on-policy tokens. When only one side of the bend is ever
  seen (z < 0 on every passed token and z > 0 on every failed one), a LeakyReLU guide is a rescaled
  policy gradient.
- gradients (losses with a guide term only): with respect to every trainable parameter of the policy,
  g_pg = the gradient of the loss with ``guide_coef`` 0 (the PPO term and any entropy bonus) and
  g_guide = the gradient of the full loss minus g_pg (= guide_coef x the guide term's gradient), each
  micro-batch weighted as in the update but the step's kept rows taken as ONE batch (not per mini-batch);
  summed over processes. ``guide_grad_ratio`` = |g_guide| / |g_pg|, ``guide_grad_cos`` = their cosine,
  ``pg_grad_norm`` / ``guide_grad_norm`` (ratio and cosine are left out when either norm is 0). Computed
  with ``torch.autograd.grad``: the optimizer's
  gradients are not touched and no random numbers are drawn, so a run's training is the same with and
  without diagnostics.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from calibrl_kernels import CalibRLConfig

from . import algorithms, distributed
from .rollout import RolloutBatch

Z_KEYS = (
    "guide_z_pos_passed",
    "guide_z_neg_passed",
    "guide_z_pos_failed",
    "guide_z_neg_failed",
    "guide_gap_passed",
    "guide_gap_failed",
    "guide_tokens",
)


def guided_token_mask(batch: RolloutBatch, loss: CalibRLConfig) -> torch.Tensor:
    """(B, T) bool: the tokens the guide term acts on (see the module docstring)."""
    rows = ~batch.is_expert  # (B,)
    if loss.weight_by_advantage:
        rows = rows & (batch.advantages != 0)
    mask = (batch.response_mask > 0) & rows[:, None]  # (B, T)
    if loss.mask_beyond_expert:
        mask = mask & batch.baseline_mask
    return mask


def z_regime(batch: RolloutBatch, loss: CalibRLConfig, dist: distributed.DistInfo) -> Dict[str, float]:
    """The ``Z_KEYS`` shares and gaps of z = -s (lp_old - b) over every process's guided tokens.

    batch: rows with old_logp, advantages, passed, baseline and baseline_mask set.
    """
    guided = guided_token_mask(batch, loss)  # (B, T)
    gap = (batch.old_logp - batch.baseline).double()  # (B, T) lp - b
    sign = torch.where(batch.passed, 1.0, -1.0).double()[:, None]  # (B, 1)
    z = -sign * gap  # (B, T)
    local: List[float] = []
    for rows in (batch.passed, ~batch.passed):
        tokens = guided & rows[:, None]  # (B, T)
        local += [
            float(tokens.sum()),
            float((tokens & (z > 0)).sum()),
            float((tokens & (z < 0)).sum()),
            float(gap[tokens].sum()),
        ]
    on_policy_tokens = float(((batch.response_mask > 0) & ~batch.is_expert[:, None]).sum())
    local_sums = torch.tensor(local + [on_policy_tokens], dtype=torch.float64, device=dist.device)
    total = distributed.all_reduce_sum(local_sums, dist).cpu().tolist()
    metrics: Dict[str, float] = {}
    for side, (count, positive, negative, gap_sum) in (("passed", total[0:4]), ("failed", total[4:8])):
        if count:  # left out when no guided token of that kind exists (no NaN in the record)
            metrics[f"guide_z_pos_{side}"] = positive / count
            metrics[f"guide_z_neg_{side}"] = negative / count
            metrics[f"guide_gap_{side}"] = gap_sum / count
    metrics["guide_tokens"] = (total[0] + total[4]) / max(total[8], 1.0)
    return metrics


def _flat_gradient(loss: torch.Tensor, params: List[torch.nn.Parameter], retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads)])


def guide_gradients(
    forward, batch: RolloutBatch, loss: CalibRLConfig, micro_batch_rows: int, dist: distributed.DistInfo
) -> Dict[str, float]:
    """Norms and cosine of the policy-gradient and guide parts of the loss's gradient (module docstring).

    forward: the unwrapped PolicyForward (no DDP hooks); batch: this process's kept rows, scored.
    """
    params = [p for p in forward.policy[0].model.parameters() if p.requires_grad]
    pg_only = loss.replace(guide_coef=0.0)
    loss_rows = len(batch) if loss.keeps_expert_rows else int((~batch.is_expert).sum())
    total_rows = float(distributed.all_reduce_sum(torch.tensor([float(loss_rows)], device=dist.device), dist))
    step = micro_batch_rows or max(len(batch), 1)
    full = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    pg = torch.zeros_like(full)
    for start in range(0, len(batch), step):
        micro = batch.select(torch.arange(start, min(start + step, len(batch))))
        micro_rows = len(micro) if loss.keeps_expert_rows else int((~micro.is_expert).sum())
        if micro_rows == 0:
            continue
        weight = micro_rows / max(total_rows, 1.0)
        device = dist.device
        hidden, head, bias = forward(**micro.forward_inputs(device))  # (R, T, D), (V, D), (V,) or None
        args = (hidden, head, bias, micro.targets().to(device), micro.loss_inputs(device))
        full += _flat_gradient(algorithms.policy_loss(*args, loss).loss * weight, params, retain=True).cpu()
        pg += _flat_gradient(algorithms.policy_loss(*args, pg_only).loss * weight, params, retain=False).cpu()
    full = distributed.all_reduce_sum(full.to(dist.device), dist).cpu()
    pg = distributed.all_reduce_sum(pg.to(dist.device), dist).cpu()
    guide = full - pg
    pg_norm, guide_norm = float(pg.norm()), float(guide.norm())
    metrics = {"pg_grad_norm": pg_norm, "guide_grad_norm": guide_norm}
    if pg_norm > 0 and guide_norm > 0:  # left out (no NaN) when either part is zero, e.g. all advantages 0
        metrics["guide_grad_ratio"] = guide_norm / pg_norm
        metrics["guide_grad_cos"] = float(torch.dot(pg, guide)) / (pg_norm * guide_norm)
    return metrics


def guide_regime(
    forward, batch: RolloutBatch, loss: CalibRLConfig, micro_batch_rows: int, dist: distributed.DistInfo
) -> Dict[str, float]:
    """Every diagnostic of the module docstring for one RL step's kept rows (before the update)."""
    metrics = z_regime(batch, loss, dist)
    if loss.uses_guide and loss.guide_coef > 0:
        metrics.update(guide_gradients(forward, batch, loss, micro_batch_rows, dist))
    return metrics
