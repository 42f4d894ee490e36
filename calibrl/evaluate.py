"""Greedy evaluation on held-out questions: accuracy, format rate, reward, response length.

Under torchrun every process answers its share of the questions; the sums are all-reduced.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from . import distributed
from .model import Policy
from .rewards import score_response
from .rollout import generate


SAMPLES_SHOWN = 6  # greedy answers kept for samples.jsonl (from the main process's share)


@torch.no_grad()
def evaluate(policy: Policy, examples: Sequence, max_new_tokens: int, batch_size: int,
             dist: distributed.DistInfo) -> Tuple[Dict[str, float], List[dict]]:
    """Mean accuracy / format / reward / response tokens of greedy answers to ``examples``, and a few samples."""
    mine = list(examples[dist.rank::dist.world_size])
    totals = torch.zeros(5, dtype=torch.float64)  # accuracy, format, reward, tokens, count
    samples: List[dict] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        prompts = policy.encode_prompts(chunk)
        responses = generate(policy, prompts, torch.arange(len(chunk)), max_new_tokens, greedy=True)
        for example, tokens in zip(chunk, responses):
            text = policy.decode_response(tokens)
            score = score_response(text, example.answer)
            totals += torch.tensor([score.accuracy, score.format, score.reward, len(tokens), 1.0], dtype=torch.float64)
            if len(samples) < SAMPLES_SHOWN:
                samples.append({"question": example.question, "answer": example.answer, "response": text,
                                "reward": score.reward})
    totals = distributed.all_reduce_sum(totals.to(dist.device), dist).cpu()
    count = max(totals[4].item(), 1.0)
    return {
        "eval_accuracy": totals[0].item() / count,
        "eval_format": totals[1].item() / count,
        "eval_reward": totals[2].item() / count,
        "eval_response_length": totals[3].item() / count,
    }, samples
