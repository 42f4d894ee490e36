"""What every trainer integration shares: the per-row fields of a hybrid batch, and the per-batch loss.

A hybrid batch holds whole groups: for each prompt (group id) ``n`` on-policy rows and, when experts are
used, exactly one expert row. Group statistics (advantages, pass flags) and the expert baseline depend on
the whole group, so they are computed once, right after scoring and before the trainer splits or
shuffles the batch, and then travel with each row as plain per-row tensors. The loss of any micro-batch
is afterwards a function of its own rows only (``calibrl_batch_loss``), which is what lets TRL shuffle,
verl re-balance and both split into micro-batches.

The numbers come from the slim trainer's own functions (``calibrl.algorithms``: group statistics, expert
baseline, policy loss), so every integration computes exactly the loss of ``python -m calibrl.train``;
those call only the public API of ``calibrl_kernels``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import calibrl_kernels as ck
from calibrl_kernels.config import LossInputs

from .. import algorithms

# Names of the per-row fields an integration adds to its trainer's batch (prefixed, so they never clash
# with the trainer's own keys). Shapes: B rows, T completion tokens.
FIELD_IS_EXPERT = "calibrl_is_expert"  # (B,) bool, True on the expert row of each group
FIELD_PASSED = "calibrl_passed"  # (B,) bool, reward > config.pass_threshold
FIELD_GROUP_IDS = "calibrl_group_ids"  # (B,) int64, one id per prompt
FIELD_SCORES = "calibrl_scores"  # (B,) float32, the scalar reward of the row
FIELD_EXPERT_LOGP = "calibrl_expert_logp"  # (B, T) float32, expert baseline b of the row's group
FIELD_EXPERT_MASK = "calibrl_expert_mask"  # (B, T) bool, the expert's token mask (mask_beyond_expert)
ROW_FIELDS = (FIELD_IS_EXPERT, FIELD_PASSED, FIELD_GROUP_IDS, FIELD_SCORES, FIELD_EXPERT_LOGP, FIELD_EXPERT_MASK)


def needs_experts(config: ck.CalibRLConfig) -> bool:
    """Whether a loss with this configuration cannot run without one expert row per group."""
    return config.uses_guide or config.keeps_expert_rows


def expert_text(value: Any, where: str) -> str:
    """The text of one expert completion, as a dataset stores it.

    ``value``: a string, an assistant message ``{"role": "assistant", "content": ...}`` or a list of
    messages (the last assistant one is taken; a message without ``role`` counts as the assistant's);
    ``content`` is a string or a list of content blocks whose ``text`` parts are joined. ``where`` names
    the field (and row) in errors: TypeError for another type, ValueError for no assistant message or an
    empty completion.
    """
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        assistant = [m for m in value if m.get("role", "assistant") == "assistant"]
        if not assistant:
            raise ValueError(f"{where}: messages without an assistant message: {value!r}")
        content = assistant[-1].get("content")
        if isinstance(content, list):  # content blocks: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        value = content
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a string or an assistant message, got {type(value).__name__}: {value!r}")
    if not value.strip():
        raise ValueError(f"{where}: expected a non-empty expert completion, got {value!r}")
    return value


def expert_token_ids(
    text: str,
    encode: Callable[[str], Sequence[int]],
    eos_token_ids: Sequence[int],
    max_tokens: Optional[int],
    where: str,
    limit_name: str,
) -> List[int]:
    """Token ids of an expert completion as the policy would emit them: ``encode(text)`` plus EOS.

    ``eos_token_ids[0]`` is appended unless the ids already end with one of ``eos_token_ids`` (none is
    appended when it is empty). More than ``max_tokens`` ids (None: no limit) raise ValueError naming
    ``where`` and the limit's setting ``limit_name``.
    """
    ids = list(encode(text))
    if eos_token_ids and (not ids or ids[-1] not in eos_token_ids):
        ids.append(eos_token_ids[0])
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(
            f"{where}: the expert completion has {len(ids)} tokens, more than {limit_name}={max_tokens}; "
            f"shorten it or raise {limit_name}"
        )
    return ids


def hybrid_batch_fields(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    config: ck.CalibRLConfig,
) -> Dict[str, torch.Tensor]:
    """Group statistics and expert baseline of a batch of whole groups, as per-row tensors.

    scores (B,) float rewards; group_ids (B,) integer; is_expert (B,) bool; old_logp (B, T) log-probs of
    the sampling policy (only the expert rows are read, for the baseline); mask (B, T) completion mask.
    Returns ``advantages`` (B,) plus the ``ROW_FIELDS`` above. A group without on-policy rows, or (when
    the configuration needs experts) without exactly one expert row, raises ValueError naming the field.
    """
    if not isinstance(is_expert, torch.Tensor) or is_expert.dtype != torch.bool:
        raise TypeError(f"is_expert: expected a torch.bool tensor, got {getattr(is_expert, 'dtype', type(is_expert))}")
    if needs_experts(config) and not bool(is_expert.any()):
        raise ValueError(
            f"is_expert: mode={config.mode!r} needs one expert row per group, got a batch without expert rows "
            "(give the dataset an expert column)"
        )
    stats = algorithms.group_statistics(scores, group_ids, is_expert, config)
    B, T = mask.shape
    if bool(is_expert.any()):
        expert_logp, expert_mask = algorithms.expert_baseline(old_logp.float(), mask, group_ids, is_expert, config)
    else:  # plain GRPO/DAPO/Dr.GRPO batches: no baseline exists and none is used
        expert_logp = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
        expert_mask = torch.zeros(B, T, dtype=torch.bool, device=mask.device)
    return {
        "advantages": stats.advantages.float(),
        FIELD_IS_EXPERT: is_expert,
        FIELD_PASSED: stats.passed,
        FIELD_GROUP_IDS: group_ids.long(),
        FIELD_SCORES: scores.float(),
        FIELD_EXPERT_LOGP: expert_logp.float(),
        FIELD_EXPERT_MASK: expert_mask,
    }


def calibrl_batch_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    fields: Dict[str, torch.Tensor],
    config: ck.CalibRLConfig,
    *,
    bias: Optional[torch.Tensor] = None,
) -> ck.LossOutput:
    """The loss of one micro-batch from last hidden states and the lm_head, with plain tensors.

    hidden (B, T, D) hidden states that predict the T completion tokens; weight (V, D) [bias (V,)];
    completion_ids, completion_mask (B, T); old_logp (B, T) or None (= the current log-probs, detached:
    the first PPO epoch on freshly sampled data); ``fields``: ``advantages`` and ``ROW_FIELDS`` as built by
    ``hybrid_batch_fields``. Calls ``calibrl_kernels.fused_linear_calibrl_loss`` (logits never exist).
    """
    missing = [name for name in ("advantages", FIELD_IS_EXPERT, FIELD_PASSED) if name not in fields]
    if missing:
        raise ValueError(f"fields: missing {missing}; build them with hybrid_batch_fields before the batch is split")
    if hidden.dtype != weight.dtype:  # e.g. an fp32 lm_head (TRL's cast_lm_head_to_fp32) behind a bf16 body
        hidden = hidden.to(weight.dtype)
    if old_logp is None:
        with torch.no_grad():
            old_logp = ck.linear_token_logprobs(
                hidden.detach(),
                weight.detach(),
                completion_ids,
                bias=None if bias is None else bias.detach(),
                temperature=config.temperature,
            )
    inputs = LossInputs(
        old_logp=old_logp.float(),
        advantages=fields["advantages"],
        mask=completion_mask,
        expert_logp=fields.get(FIELD_EXPERT_LOGP),
        passed=fields[FIELD_PASSED],
        is_expert=fields[FIELD_IS_EXPERT],
        expert_mask=fields.get(FIELD_EXPERT_MASK),
        ignore_index=algorithms.IGNORE_INDEX,
    )
    return algorithms.policy_loss(hidden, weight, bias, completion_ids, inputs, config)
