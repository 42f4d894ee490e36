"""The public ops: validate inputs once, resolve the RL batch fields into one ``LossInputs``, dispatch.

Backends receive validated, fully resolved inputs (advantages, pass flags and expert baseline already
computed) under the contract of ``_dispatch``; none of them validates or falls back again.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference
from .config import DEFAULT_CONFIG, CalibRLConfig, GroupStats, LossInputs, LossOutput


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-prob of each target under softmax(logits / temperature) [and the entropy], one pass over V.

    logits (N, V) or (B, T, V) (fp32 / bf16 / fp16 / fp64), targets (N,) or (B, T) integer.
    Returns logp [, entropy] shaped like targets, float32 (float64 for float64 logits),
    differentiable in both outputs. Targets equal to ignore_index give 0 and no gradient.
    """
    _checks.check_token_logprobs_inputs(logits, targets, temperature, ignore_index)
    _checks.check_bool_argument("return_entropy", return_entropy)
    temperature, ignore_index = float(temperature), int(ignore_index)  # NumPy scalars -> Python numbers
    targets = _checks.token_ids(targets)  # compared as int64 on every backend (uint8 never wraps ignore_index)
    fn = _dispatch.implementation("token_logprobs", logits.device, dtype=logits.dtype)
    return fn(logits, targets, temperature, ignore_index, return_entropy)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_bytes: Optional[int] = None,
):
    """token_logprobs of hidden (N, D) or (B, T, D) @ weight (V, D)^T + bias, without (N, V) logits.

    chunk_bytes: the byte budget of a logits chunk on the CPU chunked path (``chunked.chunk_budget``; None:
    the innermost ``chunked.chunk_bytes_scope``, env CALIBRL_CHUNK_BYTES, else the default).
    """
    _checks.check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    _checks.check_bool_argument("return_entropy", return_entropy)
    chunk_bytes = _checks.chunk_bytes_argument(chunk_bytes)
    temperature, ignore_index = float(temperature), int(ignore_index)  # NumPy scalars -> Python numbers
    targets = _checks.token_ids(targets)
    fn = _dispatch.implementation("linear_token_logprobs", hidden.device, dtype=hidden.dtype)
    return fn(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_bytes=chunk_bytes)


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    is_expert: Optional[torch.Tensor] = None,
    norm_by_std: bool = False,
    eps: float = 1e-6,
    pass_threshold: float = 0.1,
    num_groups: Optional[int] = None,
) -> GroupStats:
    """Group statistics over on-policy rows and per-row advantages, |A| weights and pass flags.

    scores (B,) float rewards; group_ids (B,) any integers (one id per prompt); is_expert (B,) bool.
    num_groups: the number of distinct group ids, if the caller knows it (e.g. prompts per batch):
    the (G,) outputs then need no host synchronisation on a GPU (it is verified while value checks
    are on, which synchronises; CALIBRL_VALUE_CHECKS=0 skips that).
    """
    _checks.check_group_inputs(scores, group_ids, is_expert)
    _checks.check_positive_number("eps", eps)
    _checks.check_bool_argument("norm_by_std", norm_by_std)
    _checks.check_finite_number("pass_threshold", pass_threshold)
    _checks.check_num_groups_argument(num_groups, scores.numel())
    return _group_advantages(scores, group_ids, is_expert, norm_by_std, eps, pass_threshold, num_groups)


def _group_advantages(scores, group_ids, is_expert, norm_by_std, eps, pass_threshold, num_groups) -> GroupStats:
    """group_advantages on validated inputs: dispatch only."""
    eps, num_groups = float(eps), None if num_groups is None else int(num_groups)  # NumPy scalars -> Python
    fn = _dispatch.implementation("group_advantages", scores.device)
    return fn(scores, group_ids, is_expert, norm_by_std, eps, float(pass_threshold), num_groups)


def expert_baseline(
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    *,
    kind: str = "position",
    return_mask: bool = False,
    num_groups: Optional[int] = None,
):
    """The expert baseline b (B, T) of every row from its group's expert row; see reference.expert_baseline.

    num_groups: see group_advantages (no data-dependent shapes: traceable by torch.compile).
    """
    _checks.check_expert_baseline_inputs(old_logp, mask, group_ids, is_expert)
    _checks.check_bool_argument("return_mask", return_mask)
    _checks.check_num_groups_argument(num_groups, old_logp.shape[0])
    return reference.expert_baseline(old_logp, mask, group_ids, is_expert, kind, return_mask, num_groups)


def calibrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    config: CalibRLConfig = DEFAULT_CONFIG,
) -> LossOutput:
    """The CalibRL loss from per-token log-probs (the reference semantics every fused op matches).

    logp, old_logp, mask (B, T); advantages (B,) or (B, T); expert_logp (B, T) or (B,);
    passed, is_expert (B,) bool; entropy (B, T) (needed when config.entropy_coef != 0; gives the
    entropy metric); expert_mask (B, T) (needed when config.mask_beyond_expert).
    """
    inputs = LossInputs(old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask)
    _checks.check_loss_inputs(logp, inputs, entropy=entropy, config=config)
    fields = inputs.optional_fields()
    return reference.calibrl_loss(logp, old_logp, advantages, mask, entropy=entropy, config=config, **fields)


def _resolve_loss_inputs(
    given: LossInputs, scores, group_ids, num_groups, config: CalibRLConfig, batch_shape
) -> LossInputs:
    """Validate the loss fields of a fused op once and resolve them into the LossInputs every backend takes.

    advantages / passed come from scores + group_ids when not given (group statistics), the expert baseline
    from the batch's expert rows (group_ids + is_expert) when the mode needs one and it is not given.
    given: the caller's fields (advantages / expert_logp may still be None); batch_shape: (B, T) of the targets.
    """
    old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, _ = given
    # While torch.compile traces, without num_groups: B group slots, an upper bound on the number of groups,
    # so that no size depends on the data (torch.unique would break the graph); the per-row advantages, pass
    # flags and baseline are those of the exact groups (slots past the last group stay empty and unread).
    group_slots = old_logp.shape[0] if num_groups is None and torch.compiler.is_compiling() else None
    _checks.require_tensor("old_logp", old_logp)
    _checks.require_tensor("mask", mask)
    _checks.check_ndim("old_logp", old_logp, (2,), "(B, T)")
    _checks.check_optional_group_fields(scores, group_ids, old_logp.shape[0], old_logp.device)
    if advantages is None:
        if scores is None or group_ids is None:
            raise ValueError("advantages: give either advantages (B,) / (B, T) or both scores (B,) and group_ids (B,)")
        _checks.check_group_inputs(scores, group_ids, is_expert)
        _checks.check_num_groups_argument(num_groups, scores.numel())
        settings = (config.norm_by_std, config.adv_eps, config.pass_threshold)
        if group_slots is None:
            stats = _group_advantages(scores, group_ids, is_expert, *settings, num_groups)
        else:  # traced: the torch statistics over the slots (their per-row outputs are all the loss reads)
            stats = reference.group_advantages(scores, group_ids, is_expert, *settings, group_slots)
        advantages = stats.advantages
        passed = stats.passed if passed is None else passed
    elif passed is None and scores is not None:
        passed = scores > config.pass_threshold
    if config.uses_guide and expert_logp is None:
        if group_ids is None or is_expert is None:
            raise ValueError(
                "expert_logp: required for mode='calibrl'; pass it, or pass group_ids and is_expert so that "
                "it is built from the batch's expert rows"
            )
        _checks.check_expert_baseline_inputs(old_logp, mask, group_ids, is_expert)
        expert_logp, built_mask = reference.expert_baseline(
            old_logp,
            mask,
            group_ids,
            is_expert,
            config.baseline,
            True,
            num_groups if group_slots is None else group_slots,
        )
        expert_mask = built_mask if expert_mask is None else expert_mask
    _checks.check_shape("old_logp", old_logp, batch_shape, "(B, T) like targets")
    resolved = given._replace(advantages=advantages, expert_logp=expert_logp, passed=passed, expert_mask=expert_mask)
    _checks.check_loss_inputs(
        old_logp, resolved, entropy=None, config=config, logp_name="old_logp", computes_entropy=True
    )
    return resolved


def fused_calibrl_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    scores: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    config: CalibRLConfig = DEFAULT_CONFIG,
    inplace_backward: bool = False,
    num_groups: Optional[int] = None,
) -> LossOutput:
    """log-prob, entropy and the CalibRL loss from logits (B, T, V) in one pass over the vocabulary.

    targets (B, T) sampled tokens; old_logp, mask (B, T); advantages (B,) / (B, T), or None with
    scores (B,) + group_ids (B,) to compute group statistics here (config.norm_by_std,
    config.pass_threshold). expert_logp (B, T) / (B,) or built from group_ids + is_expert.
    Targets equal to ignore_index are left out of the loss. Gradients flow to ``logits``.
    num_groups: see group_advantages (spares the host synchronisation of the scores + group_ids path).
    inplace_backward=True (opt-in) lets the backend write dL/dlogits over the logits buffer in the
    backward pass, saving a logits-sized gradient buffer: afterwards ``logits`` is overwritten (holds
    its gradient) and must not be used again; one backward pass only.
    """
    _checks.check_bool_argument("inplace_backward", inplace_backward)
    _checks.check_config(config)
    _checks.check_token_logprobs_inputs(logits, targets, config.temperature, ignore_index)
    targets = _checks.token_ids(targets)
    _checks.check_token_batch("logits", logits, "(B, T, V)")
    given = LossInputs(old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, int(ignore_index))
    inputs = _resolve_loss_inputs(given, scores, group_ids, num_groups, config, targets.shape)
    fn = _dispatch.implementation("fused_calibrl_loss", logits.device, dtype=logits.dtype)
    return fn(logits, targets, inputs, config, inplace_backward)


def fused_linear_calibrl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    config: CalibRLConfig = DEFAULT_CONFIG,
    num_groups: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
) -> LossOutput:
    """fused_calibrl_loss starting from hidden states (B, T, D) and the lm_head weight (V, D) [+ bias (V,)].

    The (B*T, V) logits are never materialised; gradients flow to hidden, weight and bias.
    chunk_bytes: see linear_token_logprobs.
    """
    _checks.check_config(config)
    _checks.check_linear_inputs(hidden, weight, targets, bias, config.temperature, ignore_index)
    chunk_bytes = _checks.chunk_bytes_argument(chunk_bytes)
    targets = _checks.token_ids(targets)
    _checks.check_token_batch("hidden", hidden, "(B, T, D)")
    given = LossInputs(old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, int(ignore_index))
    inputs = _resolve_loss_inputs(given, scores, group_ids, num_groups, config, targets.shape)
    fn = _dispatch.implementation("fused_linear_calibrl_loss", hidden.device, dtype=hidden.dtype)
    return fn(hidden, weight, targets, inputs, config, bias, chunk_bytes=chunk_bytes)
