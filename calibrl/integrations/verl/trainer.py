"""The verl 0.9 pieces that carry expert rows, expert log-probs and pass flags from rollout to actor.

verl offers no hook that hands per-row fields to a policy loss, so this module adds the smallest set of
subclasses, each registered through verl's own registries:

* ``CalibRLExpertAgentLoop`` (agent loop ``calibrl_expert_agent``, a ``SingleTurnAgentLoop``): with
  ``rollout.n = n + 1`` the first ``n`` sessions of a prompt generate as usual and the last one emits the
  prompt's expert completion (from the dataset row's ``expert`` field or ``extra_info.expert``) as its
  response, flagged ``calibrl_is_expert`` in ``extra_fields``. It then flows through verl like any row:
  reward loop, old log-prob recomputation, TransferQueue, batch balancing.
* ``CalibRLSyncTrainer`` (trainer mode ``calibrl_sync``, a ``PPOTrainerSync`` with verl's synchronous
  semantics): it refuses unsupported settings on construction (``calibrl.integrations.verl.startup_problems``);
  its advantage step (``algorithm.adv_estimator=calibrl``) reads rewards, uids, old log-probs and the expert
  flags, computes group statistics and the expert baseline (``calibrl.integrations.verl.hybrid_rows``),
  writes advantages, ``loss_mask`` (in the dtype the field already has) and the per-row fields to the
  TransferQueue and reads them back, raising when any was dropped; at set-up it installs
  ``calibrl_ppo_loss`` on the actor with verl's ``set_loss_fn``; validation rows are marked so that the
  agent loop emits no expert row for them.

Importing it needs verl's v1 trainer stack (ray, TransferQueue); ``calibrl.integrations.verl`` imports
it when available (this module imports only ``calibrl.integrations.verl.plugin``, never the package).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, List

import numpy as np
import torch

import calibrl_kernels as ck

from .. import _core
from .plugin import (
    ADV_ESTIMATOR,
    AGENT_LOOP,
    POLICY_LOSSES,
    TRAINER_MODE,
    calibrl_overrides,
    calibrl_ppo_loss,
    check_startup_config,
    hybrid_rows,
    require_verl,
)

require_verl()
import transfer_queue as tq  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register  # noqa: E402
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo.v1.trainer_base import register_trainer  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.utils.padding import response_to_nested  # noqa: E402

logger = logging.getLogger(__name__)

EXPERT_FLAG = "calibrl_is_expert"
# Marks the rows of a validation batch (set by CalibRLSyncTrainer): the agent loop then samples every session.
VALIDATION_FLAG = "calibrl_validation"


def expert_response_ids(tokenizer, text: Any, response_length: int, *, field: str = "expert") -> List[int]:
    """Token ids of an expert completion (text, assistant message or messages) as the policy would emit
    them: text tokens + EOS. Raises ValueError naming ``field`` when the text is missing/empty or longer than
    response_length (``calibrl.integrations._core.expert_text`` / ``expert_token_ids``).
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return _core.expert_token_ids(
        _core.expert_text(text, field),
        lambda t: tokenizer.encode(t, add_special_tokens=False),
        eos,
        response_length,
        field,
        "actor_rollout_ref.rollout.response_length",
    )


def expert_text_of(kwargs: dict, key: str = "expert") -> Any:
    """The expert completion of a dataset row: its ``key`` field or ``extra_info[key]``."""
    if kwargs.get(key) is not None:
        return kwargs[key]
    extra = kwargs.get("extra_info") or {}
    if isinstance(extra, dict) and extra.get(key) is not None:
        return extra[key]
    raise ValueError(f"{key}: the dataset row has no {key!r} field nor extra_info[{key!r}] (keys: {sorted(kwargs)})")


@register(AGENT_LOOP)
class CalibRLExpertAgentLoop(SingleTurnAgentLoop):
    """Single-turn agent loop whose last session per prompt emits the expert completion (rollout.n = n + 1)."""

    async def run(self, sampling_params: dict, **kwargs) -> AgentLoopOutput:
        num_sessions = int(self.rollout_config.n)
        if num_sessions < 2:
            raise ValueError(
                f"actor_rollout_ref.rollout.n: expected n on-policy sessions + 1 expert (>= 2), got {num_sessions}"
            )
        trainer_mode = self.config.trainer.v1.trainer_mode
        if trainer_mode != TRAINER_MODE:
            raise ValueError(
                f"trainer.v1.trainer_mode: the {AGENT_LOOP} agent loop needs {TRAINER_MODE} (which keeps "
                f"expert rows out of the policy loss), got {trainer_mode!r}"
            )
        validating = bool(kwargs.get(VALIDATION_FLAG, False))  # validation scores sampled answers only
        if validating or int(kwargs.get("session_id", 0)) != num_sessions - 1:
            output = await super().run(sampling_params, **kwargs)
            output.extra_fields[EXPERT_FLAG] = False
            return output
        messages = list(kwargs["raw_prompt"])
        multi_modal_data = await self.process_multi_modal_info(messages)
        self._assert_mm_supported(bool(multi_modal_data))
        prompt_ids = await self.ct_build_initial_tokens(
            messages,
            images=multi_modal_data.get("images"),
            videos=multi_modal_data.get("videos"),
            audios=multi_modal_data.get("audios"),
            mm_inputs_out={},
        )
        response_ids = expert_response_ids(self.tokenizer, expert_text_of(kwargs), self.response_length)
        logprobs = [0.0] * len(response_ids) if self.rollout_config.calculate_log_probs else None
        # The weights version the step's sessions sample with under the synchronous trainer (the rollout holds
        # step - 1's weights): the expert row then adds no staleness to verl's off-policy metrics.
        weights_version = int(kwargs["global_steps"]) - 1
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_mask=[1] * len(response_ids),
            response_logprobs=logprobs,
            multi_modal_data=multi_modal_data,
            mm_processor_kwargs=self._get_mm_processor_kwargs(multi_modal_data.get("audios")),
            num_turns=2,
            metrics={},
            extra_fields={
                EXPERT_FLAG: True,
                "turn_scores": [],
                "tool_rewards": [],
                "min_global_steps": weights_version,
                "max_global_steps": weights_version,
            },
        )


def _expert_flags(extra_fields) -> torch.Tensor:
    flags = []
    for row, extra in enumerate(extra_fields):
        if not isinstance(extra, dict) or EXPERT_FLAG not in extra:
            raise ValueError(
                f"extra_fields.{EXPERT_FLAG}: missing on row {row}; set "
                f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP}"
            )
        flags.append(bool(extra[EXPERT_FLAG]))
    return torch.tensor(flags, dtype=torch.bool)


class _MarkedValidationBatches:
    """A validation dataloader whose batches carry VALIDATION_FLAG on every row (other attributes pass through)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            batch[VALIDATION_FLAG] = np.array([True] * len(batch["raw_prompt"]), dtype=object)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _same(written: torch.Tensor, read: torch.Tensor) -> bool:
    if written.is_nested != read.is_nested:
        return False
    if written.is_nested:
        return torch.equal(written.offsets(), read.offsets()) and torch.equal(written.values(), read.values())
    return torch.equal(written, read)


def put_verified(keys: List[str], partition_id: str, fields: TensorDict):
    """tq.kv_batch_put, then a read-back of every field: RuntimeError naming each one missing or altered.

    The TransferQueue controller drops a write whose dtype differs from the field's existing dtype (for every
    field of that write) without raising from kv_batch_put; this makes such a loss impossible to miss.
    """
    meta = tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=fields)
    names = list(fields.keys())
    read = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=names)
    problems = []
    for name in names:
        if name not in read.keys():
            problems.append(f"{name}: missing")
        elif read[name].dtype != fields[name].dtype:
            problems.append(f"{name}: written as {fields[name].dtype}, read back as {read[name].dtype}")
        elif not _same(fields[name], read[name]):
            problems.append(f"{name}: read back with other values")
    if problems:
        raise RuntimeError(
            f"TransferQueue: the write to partition {partition_id!r} did not land ({'; '.join(problems)}); the "
            "controller drops a write whose dtype differs from a field's existing dtype"
        )
    return meta


@register_trainer(TRAINER_MODE)
class CalibRLSyncTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer with CalibRL's advantage step and actor loss."""

    def __init__(self, config):
        check_startup_config(config)  # before any worker, storage or dataloader starts
        super().__init__(config)

    def _build_replay_buffer(self):
        # verl keys its synchronous behaviour on the mode name "sync" (ReplayBuffer instead of the async one,
        # whole-batch dataloader fetches, no TransferQueue checkpoint); this mode is synchronous too.
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    def _init_dataloader(self):
        super()._init_dataloader()
        self.val_dataloader = _MarkedValidationBatches(self.val_dataloader)

    def _calibrl_settings(self):
        section = self.config.get("calibrl", None)
        return calibrl_overrides(None if section is None else dict(section))

    def _loss_mode(self) -> str:
        return self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")

    def actor_loss_fn(self):
        """The actor loss installed with verl's set_loss_fn: calibrl_ppo_loss bound to the actor config."""
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        return partial(calibrl_ppo_loss, config=actor_config, calibrl_overrides=self._calibrl_settings())

    def _setup(self):
        super()._setup()
        if self._loss_mode() in POLICY_LOSSES:
            self.actor_rollout_wg.set_loss_fn(self.actor_loss_fn())

    def _compute_advantage(self, batch, metrics: dict):
        if self.config.algorithm.adv_estimator != ADV_ESTIMATOR:
            return super()._compute_advantage(batch, metrics)
        if self._loss_mode() not in POLICY_LOSSES:
            raise ValueError(
                "actor_rollout_ref.actor.policy_loss.loss_mode: adv_estimator=calibrl needs one of "
                f"{sorted(POLICY_LOSSES)}, "
                f"got {self._loss_mode()!r}"
            )
        fields = ["uid", "response_mask", "loss_mask", "rm_scores", "old_log_probs", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        extra = data["extra_fields"]
        is_expert = _expert_flags(extra.tolist() if hasattr(extra, "tolist") else list(extra))
        padded = DataProto(batch=data.select("response_mask", "rm_scores", "old_log_probs").to_padded_tensor())
        uids = np.array(data["uid"].tolist() if hasattr(data["uid"], "tolist") else list(data["uid"]), dtype=object)
        config = ck.CalibRLConfig(
            mode=POLICY_LOSSES[self._loss_mode()],
            norm_by_std=bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", False)),
            **self._calibrl_settings(),
        )
        response_mask = padded.batch["response_mask"]
        rows = hybrid_rows(
            padded.batch["rm_scores"].sum(-1),
            uids,
            is_expert.to(response_mask.device),
            padded.batch["old_log_probs"],
            response_mask,
            config,
        )
        out = {}
        for name in ("advantages", "returns", _core.FIELD_EXPERT_LOGP, _core.FIELD_EXPERT_MASK):
            out[name] = response_to_nested(rows[name].float(), response_mask_nested)
        # loss_mask exists already (the agent loop writes it, int64): keep its dtype, or the write is dropped
        out["loss_mask"] = response_to_nested(rows["loss_mask"].to(data["loss_mask"].dtype), response_mask_nested)
        for name in (_core.FIELD_IS_EXPERT, _core.FIELD_PASSED, _core.FIELD_GROUP_IDS, _core.FIELD_SCORES):
            out[name] = rows[name]
        on_policy = ~rows[_core.FIELD_IS_EXPERT]
        metrics["calibrl/pass_rate"] = rows[_core.FIELD_PASSED][on_policy].float().mean().item()
        if bool(rows[_core.FIELD_IS_EXPERT].any()):
            metrics["calibrl/expert_reward"] = rows[_core.FIELD_SCORES][~on_policy].mean().item()
        return put_verified(list(batch.keys), batch.partition_id, TensorDict(out, batch_size=len(batch)))
