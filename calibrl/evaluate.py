"""Evaluation on held-out questions: greedy answers, and k temperature-1 samples per question.

- ``eval_accuracy`` / ``eval_format`` / ``eval_reward`` / ``eval_response_length`` / ``eval_truncated``:
  greedy decoding;
- ``eval_sampled_accuracy`` / ``_reward`` / ``_format`` / ``_response_length`` / ``_truncated``: means over
  ``samples`` samples per question at the training temperature (``eval_sampled_accuracy`` is pass@1 of the
  policy RL optimises), drawn from a fixed seed inside ``fork_rng`` so that every evaluation sees the same
  random numbers and the training RNG is left untouched;
- with ``samples`` > 1: ``eval_distinct_answers``, the mean number of different answers per question
  (``exploration.distinct_answers``); with ``samples`` >= 8: ``eval_pass_at_8``, the unbiased pass@8;
- ``extra_metrics`` (response, truth) -> {name: value}: each name's mean over the greedy answers
  (``eval_<name>``) and over the samples (``eval_sampled_<name>``), e.g. per-attribute accuracy.
Under torchrun every process answers its share of the questions; the sums are all-reduced.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import distributed
from .exploration import distinct_answers, pass_at_k
from .model import Policy
from .rewards import Score, score_all, score_response
from .rollout import generate, was_truncated

SAMPLES_SHOWN = 6  # greedy answers kept for samples.jsonl (from the main process's share)
SAMPLING_SEED = 1234  # seed of the sampled evaluation (the same numbers at every evaluation)
PASS_K = 8  # pass@k logged when at least k samples per question are drawn
COLUMNS = ("accuracy", "format", "reward", "response_length", "truncated")  # per-response columns, then extras
ExtraMetrics = Callable[[str, str], Dict[str, float]]


def _answer_all(
    policy: Policy,
    examples: Sequence,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
    greedy: bool,
    scorer: Callable[[str, str], Score],
    samples: int,
    truncation_fails: bool,
    extra_metrics: Optional[ExtraMetrics],
) -> Tuple[torch.Tensor, List[str], List[str]]:
    """(N * samples, len(COLUMNS) + E) float64 per-response rows (the samples of a question adjacent), the
    response texts and the E extra metric names (sorted)."""
    rows, texts, extra_names = [], [], None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        index = torch.arange(len(chunk)).repeat_interleave(samples)  # (R,) question of each response
        responses = generate(policy, policy.encode_prompts(chunk), index, max_new_tokens, temperature, greedy=greedy)
        chunk_texts = [policy.decode_response(tokens) for tokens in responses]
        truths = [chunk[i].answer for i in index.tolist()]
        cut = [was_truncated(tokens, policy.end_token_id) for tokens in responses]
        for text, truth, tokens, truncated, score in zip(
            chunk_texts, truths, responses, cut, score_all(scorer, chunk_texts, truths, cut, truncation_fails)
        ):
            extras = extra_metrics(text, truth) if extra_metrics is not None else {}
            if extra_names is None:
                extra_names = sorted(extras)
            elif sorted(extras) != extra_names:
                raise ValueError(
                    f"extra_metrics: expected the same names for every response, got {sorted(extras)} "
                    f"after {extra_names}"
                )
            rows.append(
                [score.accuracy, score.format, score.reward, len(tokens), float(truncated)]
                + [float(extras[name]) for name in extra_names]
            )
        texts += chunk_texts
    names = extra_names or []
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, len(COLUMNS) + len(names)), texts, names


def _per_question(accuracy: torch.Tensor, texts: Sequence[str], samples: int) -> List[float]:
    """[sum of pass@8 (0 when samples < 8), sum of distinct answers] over the questions of (N * samples,)."""
    correct = accuracy.reshape(-1, samples).sum(1).round().long().tolist()  # (N,)
    passed = sum(pass_at_k(samples, c, PASS_K) for c in correct) if samples >= PASS_K else 0.0
    distinct = sum(distinct_answers(texts[q * samples : (q + 1) * samples]) for q in range(len(correct)))
    return [passed, float(distinct)]


@torch.no_grad()
def evaluate(
    policy: Policy,
    examples: Sequence,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
    dist: distributed.DistInfo,
    scorer: Callable[[str, str], Score] = score_response,
    samples: int = 1,
    truncation_fails: bool = True,
    extra_metrics: Optional[ExtraMetrics] = None,
) -> Tuple[Dict[str, float], List[dict]]:
    """Greedy and sampled held-out metrics of ``examples``, and a few greedy answers to show.

    samples: temperature-1 samples per question (batch_size counts questions); truncation_fails: a response
    cut at max_new_tokens scores 0 (strict format).
    """
    if samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples}")
    mine = list(examples[dist.rank :: dist.world_size])
    common = dict(scorer=scorer, truncation_fails=truncation_fails, extra_metrics=extra_metrics)
    greedy, texts, names = _answer_all(
        policy, mine, max_new_tokens, batch_size, temperature, greedy=True, samples=1, **common
    )
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SAMPLING_SEED + dist.rank)
        sampled, sampled_texts, _ = _answer_all(
            policy, mine, max_new_tokens, batch_size, temperature, greedy=False, samples=samples, **common
        )
    width = len(COLUMNS) + len(names)
    local = torch.cat(
        [
            greedy.sum(0),
            sampled.sum(0),
            torch.tensor(
                _per_question(sampled[:, 0], sampled_texts, samples) + [float(len(mine))], dtype=torch.float64
            ),
        ]
    )
    totals = distributed.all_reduce_sum(local.to(dist.device), dist).cpu().tolist()  # (2 * width + 3,)
    questions = max(totals[-1], 1.0)
    columns = list(COLUMNS) + names
    results = {f"eval_{name}": totals[i] / questions for i, name in enumerate(columns)}
    results.update(
        {f"eval_sampled_{name}": totals[width + i] / (questions * samples) for i, name in enumerate(columns)}
    )
    if samples >= PASS_K:
        results[f"eval_pass_at_{PASS_K}"] = totals[2 * width] / questions
    if samples > 1:
        results["eval_distinct_answers"] = totals[2 * width + 1] / questions
    shown = [
        {"question": e.question, "answer": e.answer, "response": t, "reward": float(r)}
        for e, t, r in zip(mine[:SAMPLES_SHOWN], texts, greedy[:SAMPLES_SHOWN, 2])
    ]
    return results, shown
