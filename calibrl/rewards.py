"""The verifier and the reward: r = accuracy + 0.1 * format (CALIBRL.md, "Reward parsing").

- answer: the content of the FIRST ``<answer>...</answer>`` (surrounding whitespace dropped);
- accuracy: 1 when that answer equals the ground truth after ``normalize_answer``, else 0;
- format: 1 when the whole response (outer whitespace stripped) matches
  ``<think>.*?</think>.*?<answer>.*?</answer>`` with "." matching newlines, else 0.
A row passes (is correct) when r > 0.1, i.e. exactly when accuracy is 1.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

ANSWER_PATTERN = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT_PATTERN = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
FORMAT_WEIGHT = 0.1  # reward = accuracy + FORMAT_WEIGHT * format
_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`"


class Score(NamedTuple):
    reward: float  # accuracy + 0.1 * format
    accuracy: float  # 1.0 when the extracted answer matches the ground truth
    format: float  # 1.0 when the response has the <think>..</think>..<answer>..</answer> shape


def extract_answer(response: str) -> Optional[str]:
    """Content of the first <answer>...</answer>, or None when there is none."""
    match = ANSWER_PATTERN.search(response)
    return match.group(1) if match else None


def normalize_answer(answer: str) -> str:
    """Lower case, inner whitespace collapsed to one space, edge punctuation and spaces removed."""
    return " ".join(answer.lower().split()).strip(_EDGE_PUNCTUATION)


def format_reward(response: str) -> float:
    """1.0 when the stripped response is <think>...</think>...<answer>...</answer> as a whole."""
    return 1.0 if FORMAT_PATTERN.fullmatch(response.strip()) else 0.0


def accuracy_reward(response: str, truth: str) -> float:
    """1.0 when the first <answer> matches the ground truth after normalisation."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if normalize_answer(answer) == normalize_answer(truth) else 0.0


def score_response(response: str, truth: str) -> Score:
    """The reward of one response and its two parts."""
    accuracy = accuracy_reward(response, truth)
    form = format_reward(response)
    return Score(accuracy + FORMAT_WEIGHT * form, accuracy, form)
