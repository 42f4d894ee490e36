"""The verl plugin proper: CalibRL policy losses and advantage estimator for verl's registries.

``register()`` (called when ``calibrl.integrations.verl`` is imported) registers, through verl's own
registries,

* policy losses (``verl.trainer.ppo.core_algos.register_policy_loss``), selected with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=NAME``:
  ``calibrl`` (PPO dual clip + calibrated guide), ``calibrl_grpo``, ``calibrl_dapo``, ``calibrl_drgrpo``
  (PPO term on on-policy rows), ``calibrl_luffy``, ``calibrl_rlplus`` (expert rows kept). Names do not
  clash with verl's built-ins. Signature: verl's ``PolicyLossFn`` plus keyword-only per-row fields
  (``expert_logp``, ``passed``, ``is_expert``, ``expert_mask``, ``entropy``, ``calibrl_overrides``);
* the advantage estimator ``calibrl`` (``register_adv_est``; ``algorithm.adv_estimator=calibrl``):
  group statistics over on-policy rows, expert rows excluded when ``is_expert`` is given.

verl's stock actor loss (``verl.workers.utils.losses.ppo_loss``) hands a policy loss only
old/new log-probs, advantages and the mask, so expert baselines and pass flags cannot reach it. The
smallest addition that carries them is in ``calibrl.integrations.verl.trainer``: an agent loop that
emits each prompt's expert row (``calibrl_expert_agent``), a trainer mode (``calibrl_sync``, a
``PPOTrainerSync`` subclass) whose advantage step writes the per-row fields into verl's TransferQueue,
and ``calibrl_ppo_loss`` (a copy of ``ppo_loss``'s plumbing that also selects those fields), installed
on the actor with verl's ``set_loss_fn``. The modes without expert terms (``calibrl_grpo``/``dapo``/
``drgrpo``) also run under verl's stock trainer and loss.

This module imports without verl; the registrations happen when verl is importable, and the functions
raise ImportError naming the missing package only when verl itself is needed.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import calibrl_kernels as ck
from calibrl_kernels.config import AGG_EPS, LOG_RATIO_CLAMP, LOSS_AGG_MODES, MODES

from ... import algorithms
from .. import _core

# verl policy-loss name -> CalibRLConfig.mode
POLICY_LOSSES = {(mode if mode == "calibrl" else f"calibrl_{mode}"): mode for mode in MODES}
ADV_ESTIMATOR = "calibrl"
# verl names of the trainer mode and agent loop in calibrl.integrations.verl.trainer (kept here so that the
# start-up checks need no verl import).
TRAINER_MODE = "calibrl_sync"
AGENT_LOOP = "calibrl_expert_agent"
# CalibRLConfig fields that verl's own config owns (set them there, not in the `calibrl:` section).
VERL_OWNED_FIELDS = {
    "mode": "actor_rollout_ref.actor.policy_loss.loss_mode",
    "clip_low": "actor_rollout_ref.actor.clip_ratio_low",
    "clip_high": "actor_rollout_ref.actor.clip_ratio_high",
    "dual_clip_c": "actor_rollout_ref.actor.clip_ratio_c",
    "loss_agg_mode": "actor_rollout_ref.actor.loss_agg_mode",
    "loss_scale_factor": "actor_rollout_ref.actor.loss_scale_factor",
    "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
    "temperature": "actor_rollout_ref.rollout.temperature",
    "norm_by_std": "algorithm.norm_adv_by_std_in_grpo",
}


def require_verl():
    """verl.trainer.ppo.core_algos, or ImportError saying how to get it."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as error:
        raise ImportError(
            "calibrl.integrations.verl needs verl 0.9 (pip install 'calibrl[verl]'; verl 0.9.1 requires "
            f"transformers>=5.5.3,<5.11): {error}"
        ) from error
    return core_algos


def _get(config: Any, key: str, default=None):
    """config[key] for dicts, OmegaConf configs and verl's BaseConfig dataclasses (None -> default)."""
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def calibrl_overrides(section: Any) -> Dict[str, Any]:
    """The CalibRLConfig fields of a ``calibrl:`` config section, refusing the ones verl owns."""
    overrides = dict(section or {})
    for name in overrides:
        if name in VERL_OWNED_FIELDS:
            raise ValueError(f"calibrl.{name}: set it through verl's {VERL_OWNED_FIELDS[name]} instead")
        if name not in ck.CalibRLConfig.__dataclass_fields__:
            fields = sorted(ck.CalibRLConfig.__dataclass_fields__)
            raise ValueError(f"calibrl.{name}: not a CalibRLConfig field (fields: {fields})")
    return overrides


def _loss_scale_factor(actor_config: Any):
    """The constant divisor of seq-mean-token-sum-norm a verl actor uses (None: verl divides by the padded T)."""
    info = _get(actor_config, "global_batch_info", {}) or {}
    return info.get("loss_scale_factor", _get(actor_config, "loss_scale_factor"))


def check_loss_settings(mode: str, loss_agg_mode: str, loss_scale_factor) -> None:
    """Refuse verl actor settings a CalibRL policy loss cannot honour (ValueError naming verl's key)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"actor_rollout_ref.actor.loss_agg_mode: the CalibRL losses support {list(LOSS_AGG_MODES)}, "
            f"got {loss_agg_mode!r} (use token-mean, the CalibRL default)"
        )
    if mode == "drgrpo" and (loss_agg_mode != "seq-mean-token-sum-norm" or loss_scale_factor is None):
        raise ValueError(
            "actor_rollout_ref.actor.loss_agg_mode / loss_scale_factor: loss_mode calibrl_drgrpo is Dr.GRPO's "
            "aggregation, per-sequence token sums divided by a constant: set loss_agg_mode=seq-mean-token-sum-norm "
            f"and loss_scale_factor to the maximum response length (got {loss_agg_mode!r}, {loss_scale_factor!r}); "
            "for a token mean use calibrl_dapo, for a per-sequence mean calibrl_grpo"
        )


def loss_config(mode: str, actor_config: Any, loss_agg_mode: str, overrides: Optional[dict] = None) -> ck.CalibRLConfig:
    """The CalibRLConfig of a verl actor: clip ratios, dual clip and aggregation from verl's ActorConfig."""
    clip = _get(actor_config, "clip_ratio", 0.2)
    info = _get(actor_config, "global_batch_info", {}) or {}
    return ck.CalibRLConfig(
        mode=mode,
        clip_low=float(_get(actor_config, "clip_ratio_low", clip)),
        clip_high=float(_get(actor_config, "clip_ratio_high", clip)),
        dual_clip_c=float(_get(actor_config, "clip_ratio_c", 3.0)),
        loss_agg_mode=loss_agg_mode,
        loss_scale_factor=info.get("loss_scale_factor", _get(actor_config, "loss_scale_factor")),
        entropy_coef=0.0,  # verl's ppo_loss adds its own entropy bonus (actor.entropy_coeff)
        **calibrl_overrides(overrides),
    )


def global_scale(
    config: ck.CalibRLConfig, mask: torch.Tensor, is_expert: Optional[torch.Tensor], info: dict
) -> torch.Tensor:
    """Factor turning the micro-batch aggregation of calibrl_kernels into verl 0.9's global one.

    verl normalises every micro-batch loss by global counts (``batch_num_tokens`` or ``global_batch_size``
    over the data-parallel group, times ``dp_size``) and sums micro-batches (``agg_loss``). Without those
    counts the factor is 1 and the loss is exactly ``calibrl_kernels``' (micro-batch token-mean).
    """
    dp_size = int(info.get("dp_size") or 1)
    counted = mask.to(torch.float64)  # exact counts; the factor is applied to the loss in its own dtype
    if is_expert is not None and not config.keeps_expert_rows:
        counted = counted * (~is_expert)[:, None].to(torch.float64)
    if config.loss_agg_mode == "token-mean":
        total = info.get("batch_num_tokens")
        if total is None:
            if dp_size > 1:
                raise ValueError(
                    "global_batch_info.batch_num_tokens: required when dp_size > 1 (as in verl's agg_loss)"
                )
            return torch.ones((), dtype=torch.float64, device=mask.device)
        if config.mask_beyond_expert and config.uses_guide:
            raise NotImplementedError(
                "mask_beyond_expert with verl's global token normalisation: the guide term's token count differs "
                "from the policy term's; use mask_beyond_expert=False under verl"
            )
        return (counted.sum() + AGG_EPS) / float(total) * dp_size
    rows = info.get("global_batch_size")
    if rows is None:
        if dp_size > 1:
            raise ValueError("global_batch_info.global_batch_size: required when dp_size > 1 (as in verl's agg_loss)")
        return torch.ones((), device=mask.device)
    local_rows = (counted.sum(-1) > 0).sum().clamp_min(1).to(torch.float64)
    return local_rows / float(rows) * dp_size


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    mode: str = "calibrl",
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    calibrl_overrides: Optional[dict] = None,
):
    """verl policy loss (``PolicyLossFn``) computing the CalibRL loss of ``mode`` with calibrl_kernels.

    old_log_prob, log_prob, response_mask (B, T); advantages (B, T) (verl's token-level advantages) or
    (B,); expert_logp (B, T); passed, is_expert (B,) bool; expert_mask (B, T); entropy (B, T) for the
    on-policy entropy metric. Returns (loss scalar, metrics dict) like verl's built-in losses.
    """
    if rollout_is_weights is not None:
        raise ValueError(
            "rollout_is_weights: token importance weights are not part of the CalibRL loss; set "
            "algorithm.rollout_correction.rollout_is=null (and rollout_rs=null)"
        )
    check_loss_settings(mode, loss_agg_mode, _loss_scale_factor(config))
    cfg = loss_config(mode, config, loss_agg_mode, calibrl_overrides)
    if cfg.uses_guide and (expert_logp is None or passed is None):
        raise ValueError(
            "expert_logp/passed: loss_mode 'calibrl' needs the per-row expert baseline and pass flags, which verl's "
            "stock ppo_loss does not pass; run with trainer.v1.trainer_mode=calibrl_sync (see examples/verl)"
        )
    if cfg.keeps_expert_rows and is_expert is None:
        raise ValueError(
            f"is_expert: loss_mode for {mode!r} needs the (B,) expert-row flags (trainer_mode=calibrl_sync)"
        )
    out = ck.calibrl_loss(
        log_prob,
        old_log_prob,
        advantages if advantages.is_floating_point() else advantages.float(),
        response_mask,
        expert_logp=expert_logp,
        passed=passed,
        is_expert=is_expert,
        entropy=entropy,
        expert_mask=expert_mask,
        config=cfg,
    )
    info = _get(config, "global_batch_info", {}) or {}
    scale = global_scale(cfg, response_mask, is_expert, info).to(out.loss.dtype)
    loss = out.loss * scale
    metrics = {
        "actor/pg_clipfrac": out.clipfrac.item(),
        "actor/ppo_kl": clamped_ppo_kl(log_prob, old_log_prob, response_mask).item(),
        "actor/pg_clipfrac_lower": out.clipfrac_lower.item(),
        # the policy term alone and the guide term before beta, both normalised like the loss (the loss is
        # pg_loss + beta * guide_loss); calibrl_ppo_loss logs them with verl's aggregation of actor/pg_loss
        "actor/pg_loss": (out.pg_loss * scale).item(),
        "actor/guide_loss": (out.guide_loss * scale).item(),
    }
    if entropy is not None:
        metrics["actor/onpolicy_entropy"] = out.entropy.item()
    return loss, metrics


def clamped_ppo_kl(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``actor/ppo_kl``: masked mean of old - new log-prob, the difference clamped to +-20 (B, T) -> ()."""
    log_ratio = (log_prob.detach() - old_log_prob.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    m = mask.to(log_ratio.dtype)
    return (-log_ratio * m).sum() / (m.sum() + AGG_EPS)


def uid_group_ids(uids: Sequence, device=None) -> torch.Tensor:
    """verl's per-row prompt uids (strings) -> int64 group ids (B,)."""
    _, inverse = np.unique(np.asarray(list(uids), dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse, dtype=torch.long, device=device)


def compute_calibrl_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Optional[Sequence] = None,
    config: Any = None,
    is_expert: Optional[torch.Tensor] = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    pass_threshold: float = 0.1,
    **unused,
):
    """CalibRL's group statistics as a verl advantage estimator: (advantages (B, T), returns (B, T)).

    A = r - mean of the group's on-policy rows (or / (std + epsilon) with algorithm.norm_adv_by_std_in_grpo);
    expert rows (``is_expert``) get advantages but do not enter the statistics.
    """
    if index is None:
        raise ValueError("index: the per-row prompt uid is required for group statistics")
    scores = token_level_rewards.sum(dim=-1).float()
    if len(index) != scores.shape[0]:
        raise ValueError(f"index: expected {scores.shape[0]} uids (one per row), got {len(index)}")
    norm = norm_adv_by_std_in_grpo
    if norm is None:
        norm = bool(_get(config, "norm_adv_by_std_in_grpo", False))
    # the slim trainer's group statistics (as _core uses them), configured by verl's settings
    statistics = ck.CalibRLConfig(norm_by_std=bool(norm), adv_eps=epsilon, pass_threshold=pass_threshold)
    stats = algorithms.group_statistics(scores, uid_group_ids(index, scores.device), is_expert, statistics)
    advantages = stats.advantages[:, None] * response_mask
    return advantages, advantages


def hybrid_rows(
    scores: torch.Tensor,
    uids: Sequence,
    is_expert: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    config: ck.CalibRLConfig,
) -> Dict[str, torch.Tensor]:
    """Everything the advantage step of ``calibrl_sync`` writes back to verl, from plain tensors.

    scores (B,), uids (B,) prompt uids, is_expert (B,) bool, old_log_probs and response_mask (B, T).
    Returns token-level ``advantages``/``returns`` (B, T) float32, ``loss_mask`` (B, T) in response_mask's
    dtype (expert rows zeroed for modes that drop them, so that verl's global token count, the sum of
    ``loss_mask``, counts the tokens the loss counts) and the per-row fields of ``calibrl.integrations._core``.
    """
    group_ids = uid_group_ids(uids, scores.device)
    fields = _core.hybrid_batch_fields(scores.float(), group_ids, is_expert, old_log_probs, response_mask, config)
    token_advantages = fields.pop("advantages")[:, None] * response_mask.float()
    loss_mask = response_mask * counted_rows(config, is_expert)[:, None].to(response_mask.dtype)
    return {"advantages": token_advantages, "returns": token_advantages, "loss_mask": loss_mask, **fields}


def counted_rows(config: ck.CalibRLConfig, is_expert: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows whose tokens the loss of ``config`` counts (expert rows only for luffy / rlplus)."""
    return torch.ones_like(is_expert) if config.keeps_expert_rows else ~is_expert


def calibrl_ppo_loss(config, model_output, data, dp_group=None, calibrl_overrides: Optional[dict] = None):
    """verl's ``ppo_loss`` plumbing with the CalibRL per-row fields handed to the policy loss.

    Same arguments and return as ``verl.workers.utils.losses.ppo_loss`` (bind ``config`` with
    functools.partial and install with ``set_loss_fn``); loss modes other than the CalibRL ones are
    delegated to verl's ``ppo_loss`` unchanged.
    """
    require_verl()
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in POLICY_LOSSES:
        return ppo_loss(config, model_output, data, dp_group)
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    for key in ("dp_size", "batch_num_tokens", "global_batch_size"):
        config.global_batch_info[key] = data[key]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    global_normalisation = (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )
    metric_aggregation = AggregationType.SUM if global_normalisation else AggregationType.MEAN

    fields = [
        "response_mask",
        "old_log_probs",
        "advantages",
        _core.FIELD_IS_EXPERT,
        _core.FIELD_PASSED,
        _core.FIELD_EXPERT_LOGP,
        _core.FIELD_EXPERT_MASK,
    ]
    missing = [name for name in fields if name not in data.keys()]
    if missing:
        raise ValueError(f"data: missing {missing}; loss_mode {loss_mode!r} needs trainer.v1.trainer_mode=calibrl_sync")
    optional = [name for name in ("rollout_is_weights", "ref_log_prob") if name in data.keys()]
    batch = data.select(*fields, *optional).to_padded_tensor()
    response_mask = batch["response_mask"].to(bool)
    pg_loss, pg_metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=batch["old_log_probs"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=response_mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=batch.get("rollout_is_weights", None),
        expert_logp=batch[_core.FIELD_EXPERT_LOGP].float(),
        passed=batch[_core.FIELD_PASSED].bool(),
        is_expert=batch[_core.FIELD_IS_EXPERT].bool(),
        expert_mask=batch[_core.FIELD_EXPERT_MASK].bool(),
        entropy=None if entropy is None else entropy.detach(),
        calibrl_overrides=calibrl_overrides,
    )
    # the loss terms (globally normalised, summed over micro-batches like verl's actor/pg_loss); ratios and
    # fractions as micro-batch means
    loss_terms = {name: pg_metrics.pop(name) for name in ("actor/pg_loss", "actor/guide_loss")}
    metrics = dict(Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN))
    metrics.update(Metric.from_dict(loss_terms, aggregation=metric_aggregation))
    policy_loss_value = pg_loss
    # entropy bonus and KL loss over the tokens the policy loss counts (expert rows only for luffy / rlplus),
    # so that their sums match verl's global token count (the sum of the loss_mask the advantage step wrote)
    is_expert = batch[_core.FIELD_IS_EXPERT].bool()
    counted_mask = (
        response_mask
        & counted_rows(
            loss_config(POLICY_LOSSES[loss_mode], config, config.loss_agg_mode, calibrl_overrides), is_expert
        )[:, None]
    )
    if entropy is not None:
        entropy_loss = agg_loss(
            loss_mat=entropy, loss_mask=counted_mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
        )
        policy_loss_value = policy_loss_value - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)
    if config.use_kl_loss:
        kld = kl_penalty(logprob=log_prob, ref_logprob=batch["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(
            loss_mat=kld, loss_mask=counted_mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
        )
        policy_loss_value = policy_loss_value + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss_value, metrics


def _select(config: Any, dotted: str, default=None):
    """config.a.b.c for nested dicts / OmegaConf configs; default where a key is missing or None."""
    node = config
    for key in dotted.split("."):
        node = _get(node, key)
        if node is None:
            return default
    return node


def startup_problems(config: Any) -> List[str]:
    """Every setting of a verl configuration that a CalibRL run cannot honour, each naming the alternative.

    ``config`` is verl's full trainer configuration (OmegaConf or nested dicts). Empty when the
    configuration uses no CalibRL piece. ``CalibRLSyncTrainer`` and ``python -m calibrl.integrations.verl.main``
    raise on these before any worker starts.
    """
    loss_mode = _select(config, "actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla")
    adv_estimator = _select(config, "algorithm.adv_estimator")
    trainer_mode = _select(config, "trainer.v1.trainer_mode", "sync")
    agent_loop = _select(config, "actor_rollout_ref.rollout.agent.default_agent_loop")
    if (
        loss_mode not in POLICY_LOSSES
        and adv_estimator != ADV_ESTIMATOR
        and trainer_mode != TRAINER_MODE
        and agent_loop != AGENT_LOOP
    ):
        return []
    problems = []
    try:
        overrides = calibrl_overrides(_select(config, "calibrl"))
    except ValueError as error:
        return [str(error)]
    if loss_mode not in POLICY_LOSSES:
        return [
            f"actor_rollout_ref.actor.policy_loss.loss_mode: the CalibRL pieces in use "
            f"(adv_estimator={adv_estimator!r}, "
            f"trainer_mode={trainer_mode!r}, agent loop {agent_loop!r}) need one of {sorted(POLICY_LOSSES)}, "
            f"got {loss_mode!r}"
        ]
    mode = POLICY_LOSSES[loss_mode]
    loss = ck.CalibRLConfig(mode=mode, **overrides)
    actor = "actor_rollout_ref.actor"
    loss_agg_mode = _select(config, f"{actor}.loss_agg_mode", "token-mean")
    try:
        check_loss_settings(mode, loss_agg_mode, _select(config, f"{actor}.loss_scale_factor"))
    except ValueError as error:
        problems.append(str(error))
    if mode == "drgrpo" and _select(config, "algorithm.norm_adv_by_std_in_grpo", True):
        problems.append(
            "algorithm.norm_adv_by_std_in_grpo: calibrl_drgrpo uses A = r - mean (Dr.GRPO); set it to false"
        )
    needs_experts = _core.needs_experts(loss)
    if needs_experts:
        for key, value, wanted in (
            ("trainer.v1.trainer_mode", trainer_mode, TRAINER_MODE),
            ("algorithm.adv_estimator", adv_estimator, ADV_ESTIMATOR),
            ("actor_rollout_ref.rollout.agent.default_agent_loop", agent_loop, AGENT_LOOP),
        ):
            if value != wanted:
                problems.append(
                    f"{key}: loss_mode {loss_mode!r} needs expert rows, carried by {key}={wanted}; got {value!r}"
                )
    if trainer_mode == TRAINER_MODE and not _select(config, "trainer.use_v1", True):
        problems.append(f"trainer.use_v1: trainer_mode {TRAINER_MODE} is a v1 trainer; set trainer.use_v1=true")
    if agent_loop == AGENT_LOOP and trainer_mode != TRAINER_MODE:
        problems.append(
            f"trainer.v1.trainer_mode: the {AGENT_LOOP} agent loop emits expert rows that only "
            f"{TRAINER_MODE} keeps out of the policy loss; got {trainer_mode!r}"
        )
    rollout_correction = _select(config, "algorithm.rollout_correction") or {}
    for key in ("rollout_is", "rollout_rs"):
        if _get(rollout_correction, key) is not None:
            problems.append(
                f"algorithm.rollout_correction.{key}: rollout importance weights / rejection sampling are "
                f"not part of the CalibRL loss; set it to null"
            )
    if _get(rollout_correction, "bypass_mode", False) and (loss.uses_guide or loss.keeps_expert_rows):
        problems.append(
            "algorithm.rollout_correction.bypass_mode: it takes old log-probs from the rollout engine, which has none "
            f"for expert rows (the expert baseline / expert-token terms of {loss_mode!r} would read 0.0); set it "
            "to false so that the actor recomputes old log-probs for every row"
        )
    if adv_estimator == ADV_ESTIMATOR and _select(config, "algorithm.use_kl_in_reward", False):
        problems.append(
            "algorithm.use_kl_in_reward: would change the task reward that decides CalibRL's pass flags; "
            "set it to false and use actor_rollout_ref.actor.use_kl_loss=true (a KL loss term) instead"
        )
    if loss.mask_beyond_expert and loss.uses_guide and loss_agg_mode == "token-mean":
        problems.append(
            "calibrl.mask_beyond_expert: the guide term would count other tokens than verl's global token "
            "count; use mask_beyond_expert=false under verl"
        )
    rollout_n = int(_select(config, "actor_rollout_ref.rollout.n", 1))
    if agent_loop == AGENT_LOOP and rollout_n < 2:
        problems.append(
            f"actor_rollout_ref.rollout.n: the {AGENT_LOOP} agent loop needs n on-policy sessions + 1 "
            f"expert session (>= 2), got {rollout_n}"
        )
    return problems


def transfer_queue_problem(config: Any, num_cpus: float) -> Optional[str]:
    """Why verl's TransferQueue cannot start on a Ray cluster with ``num_cpus`` CPUs, or None.

    Its controller and each SimpleStorage unit are Ray actors holding one CPU each; when they do not fit,
    ``tq.init`` waits for them forever (verl's default is 8 units).
    """
    if _select(config, "transfer_queue.backend.storage_backend", "SimpleStorage") != "SimpleStorage":
        return None
    units = int(_select(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", 8))
    if units + 1 <= num_cpus:
        return None
    fitting = max(int(num_cpus) - 1, 0)
    return (
        f"transfer_queue.backend.SimpleStorage.num_data_storage_units: {units} storage units + the TransferQueue "
        f"controller need {units + 1} Ray CPUs, the cluster has {num_cpus:g}, and verl would wait for them forever; "
        f"set it to at most {fitting}"
        + (" or " if fitting else "; ")
        + "raise ray_kwargs.ray_init.num_cpus (Ray's logical CPUs may exceed the cores)"
    )


def check_startup_config(config: Any) -> None:
    """ValueError listing every problem of ``startup_problems`` (nothing when there is none)."""
    problems = startup_problems(config)
    if problems:
        raise ValueError("CalibRL on verl: unsupported settings:\n  " + "\n  ".join(problems))


def _named_policy_loss(name: str, mode: str):
    fn = functools.partial(policy_loss, mode=mode)
    fn.__name__ = f"compute_policy_loss_{name}"
    fn.__doc__ = f"verl policy loss {name!r}: the CalibRL loss with CalibRLConfig.mode={mode!r}."
    return fn


def register() -> bool:
    """Register the policy losses and the advantage estimator in verl's registries (idempotent).

    Returns False (and registers nothing) when verl is not installed.
    """
    try:
        core_algos = require_verl()
    except ImportError:
        return False
    for name, mode in POLICY_LOSSES.items():
        if not getattr(core_algos.POLICY_LOSS_REGISTRY.get(name), "_calibrl", False):
            fn = _named_policy_loss(name, mode)
            fn._calibrl = True
            core_algos.register_policy_loss(name)(fn)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR) is not compute_calibrl_outcome_advantage:
        core_algos.register_adv_est(ADV_ESTIMATOR)(compute_calibrl_outcome_advantage)
    return True
