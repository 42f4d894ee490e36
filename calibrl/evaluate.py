"""Evaluation on held-out questions: greedy answers, and one temperature-1 sample per question.

- ``eval_accuracy`` / ``eval_format`` / ``eval_reward`` / ``eval_response_length``: greedy decoding;
- ``eval_sampled_accuracy`` / ``eval_sampled_reward``: one sample per question at the training
  temperature (pass@1 of the policy RL optimises), drawn from a fixed seed inside ``fork_rng`` so
  that every evaluation sees the same random numbers and the training RNG is left untouched.
Under torchrun every process answers its share of the questions; the sums are all-reduced.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from . import distributed
from .model import Policy
from .rewards import Score, score_response
from .rollout import generate

SAMPLES_SHOWN = 6  # greedy answers kept for samples.jsonl (from the main process's share)
SAMPLING_SEED = 1234  # seed of the sampled evaluation (the same numbers at every evaluation)


def _answer_all(policy: Policy, examples: Sequence, max_new_tokens: int, batch_size: int, temperature: float,
                greedy: bool, scorer: Callable[[str, str], Score]) -> Tuple[torch.Tensor, List[str]]:
    """(N, 5) float64 rows [accuracy, format, reward, tokens, 1] and the response texts."""
    rows, texts = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        responses = generate(policy, policy.encode_prompts(chunk), torch.arange(len(chunk)), max_new_tokens,
                             temperature, greedy=greedy)
        for example, tokens in zip(chunk, responses):
            text = policy.decode_response(tokens)
            score = scorer(text, example.answer)
            rows.append([score.accuracy, score.format, score.reward, len(tokens), 1.0])
            texts.append(text)
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5), texts


@torch.no_grad()
def evaluate(policy: Policy, examples: Sequence, max_new_tokens: int, batch_size: int, temperature: float,
             dist: distributed.DistInfo, scorer: Callable[[str, str], Score] = score_response
             ) -> Tuple[Dict[str, float], List[dict]]:
    """Greedy and sampled held-out metrics of ``examples``, and a few greedy answers to show."""
    mine = list(examples[dist.rank::dist.world_size])
    greedy, texts = _answer_all(policy, mine, max_new_tokens, batch_size, temperature, greedy=True, scorer=scorer)
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SAMPLING_SEED + dist.rank)
        sampled, _ = _answer_all(policy, mine, max_new_tokens, batch_size, temperature, greedy=False, scorer=scorer)
    totals = torch.cat([greedy.sum(0), sampled.sum(0)])  # (10,)
    totals = distributed.all_reduce_sum(totals.to(dist.device), dist).cpu()
    count = max(totals[4].item(), 1.0)
    samples = [{"question": e.question, "answer": e.answer, "response": t, "reward": float(r)}
               for e, t, r in zip(mine[:SAMPLES_SHOWN], texts, greedy[:SAMPLES_SHOWN, 2])]
    return {
        "eval_accuracy": totals[0].item() / count,
        "eval_format": totals[1].item() / count,
        "eval_reward": totals[2].item() / count,
        "eval_response_length": totals[3].item() / count,
        "eval_sampled_accuracy": totals[5].item() / count,
        "eval_sampled_reward": totals[7].item() / count,
    }, samples
