"""Rollouts: sample n responses per prompt, add the expert row, score every row, old log-probs.

Row layout of a batch of P prompts (groups): for each prompt, its n on-policy rows, then its expert
row, so B = P * (n + 1). Every row is [left-padded prompt | response padded on the right].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch

from calibrl_kernels.config import LossInputs

from .algorithms import IGNORE_INDEX, response_logprobs
from .model import Policy, PolicyForward, PromptBatch
from .rewards import Score, score_all, score_response


@dataclasses.dataclass
class RolloutBatch:
    prompts: PromptBatch  # the P prompts the rows answer
    prompt_index: torch.Tensor  # (B,) int64 row -> prompt in ``prompts``
    group_ids: torch.Tensor  # (B,) int64 one id per prompt, unique over all processes
    is_expert: torch.Tensor  # (B,) bool the expert (off-policy) row of each group
    response_ids: torch.Tensor  # (B, T) int64 response tokens (end token included), pad after
    response_mask: torch.Tensor  # (B, T) float32 1.0 on response tokens, 0.0 on padding
    rewards: torch.Tensor  # (B,) float32 accuracy + 0.1 * format
    accuracy: torch.Tensor  # (B,) float32 1.0 when the answer is correct
    format: torch.Tensor  # (B,) float32 1.0 when the response has the <think>/<answer> format
    truncated: torch.Tensor  # (B,) bool sampled response cut at max_new_tokens (no end token)
    texts: List[str]  # (B,) decoded responses
    # Filled in by the RL step after scoring (None until then):
    old_logp: Optional[torch.Tensor] = None  # (B, T) float32 log-prob under the sampling policy, 0 on padding
    advantages: Optional[torch.Tensor] = None  # (B,) float32 group-relative advantage of the row
    passed: Optional[torch.Tensor] = None  # (B,) bool the row's reward passes (it is correct)
    baseline: Optional[torch.Tensor] = None  # (B, T) float32 expert baseline b of the row's group
    baseline_mask: Optional[torch.Tensor] = None  # (B, T) bool the group's expert token mask
    token_entropy: Optional[torch.Tensor] = None  # (B, T) float32 entropy of the sampling policy, 0 on padding

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The batch restricted to ``rows`` (R,) int64, in that order (prompts are shared)."""
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif f.name == "texts":
                value = [value[i] for i in rows.tolist()]
            fields[f.name] = value
        return RolloutBatch(**fields)

    def targets(self) -> torch.Tensor:
        """(B, T) int64 response tokens with IGNORE_INDEX on padding."""
        return response_targets(self.response_ids, self.response_mask)

    def loss_inputs(self, device: torch.device) -> LossInputs:
        """The per-token loss inputs of every row on ``device`` (old_logp, advantages, passed, baseline set)."""
        return LossInputs(
            old_logp=self.old_logp.to(device),
            advantages=self.advantages.to(device),
            mask=self.response_mask.to(device),
            expert_logp=self.baseline.to(device),
            passed=self.passed.to(device),
            is_expert=self.is_expert.to(device),
            expert_mask=self.baseline_mask.to(device),
            ignore_index=IGNORE_INDEX,
        )

    def forward_inputs(self, device: torch.device) -> dict:
        """Arguments of PolicyForward for every row of the batch."""
        return sequence_inputs(self.prompts, self.prompt_index, self.response_ids, self.response_mask, device)


def response_targets(response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(R, T) int64 targets of the loss: the response tokens (R, T), IGNORE_INDEX where the mask (R, T) is 0."""
    return response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)


def sequence_inputs(
    prompts: PromptBatch,
    prompt_index: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    device: torch.device,
) -> dict:
    """PolicyForward arguments of rows [prompt ``prompt_index`` (R,) | response (R, T)]."""
    prompt_ids = prompts.input_ids[prompt_index]  # (R, Lp) left padded
    prompt_mask = prompts.attention_mask[prompt_index]  # (R, Lp)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)  # (R, Lp + T)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1).to(device)  # (R, Lp + T)
    vision = prompts.vision_inputs(prompt_index, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_len": response_ids.shape[1], **vision}


def _generation_config(policy: Policy, max_new_tokens: int, temperature: float, greedy: bool):
    """Plain sampling from the policy (no top-k / top-p / repetition penalty of the checkpoint's config)."""
    from transformers import GenerationConfig

    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        do_sample=not greedy,
        max_new_tokens=max_new_tokens,
        eos_token_id=policy.stop_token_ids,
        pad_token_id=policy.pad_token_id,
        suppress_tokens=policy.suppressed_token_ids or None,
        repetition_penalty=1.0,
        **sampling,
    )


@torch.no_grad()
def generate(
    policy: Policy,
    prompts: PromptBatch,
    prompt_index: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> List[List[int]]:
    """One response per row (rows repeat prompts ``prompt_index`` (R,)); token lists end at the end token."""
    device = policy.device
    vision = prompts.vision_inputs(prompt_index, device)
    inputs = policy.model_inputs(
        prompts.input_ids[prompt_index].to(device), prompts.attention_mask[prompt_index].to(device), vision
    )
    inputs.pop("position_ids", None)  # generate derives positions from the attention mask itself
    was_training = policy.model.training
    policy.model.eval()
    with policy.precision():  # the same autocast as the old log-probs and the update: pi_old samples
        output = policy.model.generate(
            **inputs, generation_config=_generation_config(policy, max_new_tokens, temperature, greedy)
        )
    policy.model.train(was_training)
    new_tokens = output[:, prompts.input_ids.shape[1] :].tolist()  # (R, <= max_new_tokens)
    return [_cut_at_stop(row, policy.stop_token_ids, policy.end_token_id) for row in new_tokens]


def _cut_at_stop(tokens: List[int], stop_ids: Sequence[int], end_id: int) -> List[int]:
    """Tokens up to and including the first stop token (normalised to the end token)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i] + [end_id]
    return tokens


def was_truncated(tokens: Sequence[int], end_token_id: int) -> bool:
    """True when a sampled response (as ``generate`` returns it) was cut at max_new_tokens: no end token."""
    return not tokens or tokens[-1] != end_token_id


def collate_responses(rows: List[List[int]], pad_id: int):
    """Right-padded (B, T) ids and (B, T) float mask of token lists."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1.0
    return ids, mask


def collect_rollouts(
    policy: Policy,
    examples: Sequence,
    group_ids: Sequence[int],
    rollouts_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    scorer: Callable[[str, str], Score] = score_response,
    truncation_fails: bool = True,
) -> RolloutBatch:
    """P prompts x (n sampled rows + 1 expert row), scored by ``scorer`` (response, truth) -> Score; with
    ``truncation_fails`` a row cut at max_new_tokens scores 0 (a format failure, see ``rewards.score_all``)."""
    prompts = policy.encode_prompts(examples)
    num_prompts, n = len(examples), rollouts_per_prompt
    sample_index = torch.arange(num_prompts).repeat_interleave(n)  # (P * n,)
    sampled = generate(policy, prompts, sample_index, max_new_tokens, temperature)
    rows, prompt_index, is_expert, truncated = [], [], [], []
    for p, example in enumerate(examples):
        for k in range(n):
            tokens = sampled[p * n + k]
            rows.append(tokens)
            truncated.append(was_truncated(tokens, policy.end_token_id))
        rows.append(policy.encode_response(example.expert))
        truncated.append(False)
        prompt_index += [p] * (n + 1)
        is_expert += [False] * n + [True]
    response_ids, response_mask = collate_responses(rows, policy.pad_token_id)
    texts = [policy.decode_response(r) for r in rows]
    answers = [examples[p].answer for p in prompt_index]
    scores = torch.tensor(
        [tuple(s) for s in score_all(scorer, texts, answers, truncated, truncation_fails)], dtype=torch.float32
    )  # (B, 3)
    return RolloutBatch(
        prompts=prompts,
        prompt_index=torch.tensor(prompt_index, dtype=torch.long),
        group_ids=torch.tensor([group_ids[p] for p in prompt_index], dtype=torch.long),
        is_expert=torch.tensor(is_expert, dtype=torch.bool),
        response_ids=response_ids,
        response_mask=response_mask,
        rewards=scores[:, 0].contiguous(),
        accuracy=scores[:, 1].contiguous(),
        format=scores[:, 2].contiguous(),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        texts=texts,
    )


@torch.no_grad()
def old_logprobs(
    forward: PolicyForward, batch: RolloutBatch, temperature: float, micro_batch_rows: int, return_entropy: bool = False
):
    """(B, T) float32 log-probs of the response tokens under the current policy, 0 on padding [and the
    (B, T) float32 entropy of the policy at each response position, 0 on padding].

    Computed from the final hidden states with ``linear_token_logprobs``: no (B, T, V) logits. The
    forward pass runs under the policy's precision, like the sampling and the update. Asking for the
    entropy leaves the log-probs unchanged (the same pass over the vocabulary).
    """
    policy = forward.policy[0]
    device = policy.device
    step = micro_batch_rows or len(batch)
    logps, entropies = [], []
    for start in range(0, len(batch), step):
        rows = torch.arange(start, min(start + step, len(batch)))
        micro = batch.select(rows)
        hidden, weight, bias = forward(**micro.forward_inputs(device))  # (R, T, D), (V, D)
        out = response_logprobs(
            hidden, weight, bias, micro.targets().to(device), temperature, return_entropy=return_entropy
        )  # (R, T) [, (R, T)]
        logps.append((out[0] if return_entropy else out).float().cpu())
        if return_entropy:
            entropies.append(out[1].float().cpu())
    return (torch.cat(logps), torch.cat(entropies)) if return_entropy else torch.cat(logps)
