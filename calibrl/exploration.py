"""Exploration measured where it lives: per response and per answer, not only per token.

Per-token entropy falls when responses get longer without any loss of diversity, so RL steps also log
(on-policy rows of every process, from the sampling policy's per-token entropies H_t at the sampling
temperature):
- ``response_entropy``: sum of H_t over a response, mean over rows (nats per response);
- ``answer_entropy``: sum of H_t over the tokens of the response's answer (the content of its first
  ``<answer>...</answer>``), mean over the rows that have one (``answer_rows``: their share; left out of
  the record when no row has one);
- ``format_failures``: {reason: share of rows} for each of ``rewards.FORMAT_VIOLATIONS`` (why rows fail
  the strict format: truncated, extra tags, text after the answer, ...).
Held-out evaluations (``calibrl.evaluate``) add ``distinct_answers`` and ``pass_at_k`` from k samples per
question, with the helpers below.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import distributed
from .rewards import ANSWER_PATTERN, FORMAT_VIOLATIONS, format_violation, normalize_answer

NO_ANSWER = "<no answer>"  # the answer class of a response without an <answer> block (distinct answers)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a question from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_class(response: str) -> str:
    """The normalised content of the first <answer> block (``NO_ANSWER`` when there is none): what the
    response answers, whatever its format, so a format problem does not hide how varied the answers are."""
    match = ANSWER_PATTERN.search(response)
    return normalize_answer(match.group(1)) if match else NO_ANSWER


def distinct_answers(responses: Sequence[str]) -> int:
    """How many different answers (``answer_class``) the responses to one question give."""
    return len({answer_class(r) for r in responses})


def token_char_spans(decode, tokens: Sequence[int]) -> List[Tuple[int, int]]:
    """[start, end) character span of each token in ``decode(tokens)``.

    Token texts are decoded one by one; where their concatenation is not the decoded response (a
    multi-byte character split over tokens) the spans come from decoding every prefix instead.
    """
    pieces = [decode([t]) for t in tokens]
    if "".join(pieces) != decode(list(tokens)):
        pieces = []
        previous = ""
        for i in range(1, len(tokens) + 1):
            prefix = decode(list(tokens[:i]))
            pieces.append(prefix[len(previous) :] if prefix.startswith(previous) else "")
            previous = prefix
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


def answer_token_mask(
    decode,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    texts: Sequence[str],
    rows: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """(B, T) bool: the tokens that overlap the content of each response's first <answer> block.

    response_ids, response_mask (B, T); texts (B,) the decoded responses; ``rows``: only these rows
    (default all). Rows without an answer block are all False.
    """
    mask = torch.zeros(response_ids.shape, dtype=torch.bool)
    for row in range(len(texts)) if rows is None else rows:
        match = ANSWER_PATTERN.search(texts[row])
        if match is None:
            continue
        start, end = match.span(1)
        tokens = response_ids[row][response_mask[row] > 0].tolist()
        for t, (a, b) in enumerate(token_char_spans(decode, tokens)):
            if a < end and b > start and b > a:  # the token's text overlaps the answer
                mask[row, t] = True
    return mask


def rollout_exploration(batch, decode, dist: distributed.DistInfo) -> Dict[str, object]:
    """Per-response and answer entropy and the strict-format failure shares of the on-policy rows of
    every process. batch: a RolloutBatch with ``token_entropy`` (B, T) set; decode: token ids -> text."""
    on = ~batch.is_expert  # (B,)
    on_rows = on.nonzero().squeeze(1).tolist()
    entropy = batch.token_entropy.double() * batch.response_mask.double()  # (B, T), 0 on padding
    answer = answer_token_mask(decode, batch.response_ids, batch.response_mask, batch.texts, on_rows)  # (B, T)
    has_answer = answer.any(1) & on  # (B,)
    failures = [format_violation(batch.texts[r], bool(batch.truncated[r])) for r in on_rows]
    local = torch.tensor(
        [
            float(on.sum()),
            float(entropy[on].sum()),
            float(has_answer.sum()),
            float((entropy * answer)[has_answer].sum()),
            *[float(sum(f == reason for f in failures)) for reason in FORMAT_VIOLATIONS],
        ],
        dtype=torch.float64,
    )
    total = distributed.all_reduce_sum(local.to(dist.device), dist).cpu().tolist()
    rows, answered = max(total[0], 1.0), total[2]
    metrics: Dict[str, object] = {"response_entropy": total[1] / rows, "answer_rows": answered / rows}
    if answered:  # left out (not NaN) when no row has an answer block
        metrics["answer_entropy"] = total[3] / answered
    metrics["format_failures"] = {reason: round(count / rows, 4) for reason, count in zip(FORMAT_VIOLATIONS, total[4:])}
    return metrics
