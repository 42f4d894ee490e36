"""The verifier and the reward: r = accuracy + 0.1 * format (CALIBRL.md, "Reward parsing").

- answer: the content of the FIRST ``<answer>...</answer>`` (surrounding whitespace dropped);
- accuracy: 1 when that answer equals the ground truth after ``normalize_answer``, else 0;
- format: 1 when the whole response (outer whitespace stripped) matches
  ``<think>.*?</think>.*?<answer>.*?</answer>`` with "." matching newlines, else 0.
A row passes (is correct) when r > 0.1, i.e. exactly when accuracy is 1.

``--reward-fn package.module:function`` replaces ``score_response`` with your own verifier; every call goes
through ``GuardedScorer``, so a verifier that raises on one sample scores that sample 0 and the step goes on
(the count is logged as ``reward_errors``, the first message printed).
"""

from __future__ import annotations

import numbers
import re
from typing import Callable, NamedTuple, Optional, Tuple, Union

ANSWER_PATTERN = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT_PATTERN = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
FORMAT_WEIGHT = 0.1  # reward = accuracy + FORMAT_WEIGHT * format
_FLOAT32_MAX = 3.4028234663852886e38  # rewards travel as float32 tensors: a larger one would become inf
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


RewardFn = Callable[[str, str], Union[Score, float]]  # (response, ground truth) -> Score or a reward


def load_reward_fn(spec: Optional[str]) -> RewardFn:
    """``score_response``, or the function named by ``spec`` ("package.module:function").

    The function takes (response, ground truth) and returns a ``Score`` or a number (the reward; the row
    then counts as correct when the reward exceeds FORMAT_WEIGHT, and its format as 0).
    """
    if spec is None:
        return score_response
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward_fn: expected 'package.module:function', got {spec!r}")
    import importlib

    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward_fn: cannot load {spec!r}: {error}") from error
    if not callable(fn):
        raise ValueError(f"reward_fn: {spec!r} is a {type(fn).__name__}, not a function")
    return fn


class GuardedScorer:
    """Calls a reward function per sample; a sample on which it raises, or returns something that is not a
    finite number / Score of numbers (text is not parsed; a number beyond float32's range, e.g. 1e39, counts
    as non-finite), scores 0 (reward, accuracy and format) instead of stopping the step.

    ``take_errors()`` returns and clears the failures since the last call (count, first message), so the
    trainer can log them with the step in which they happened.
    """

    def __init__(self, fn: RewardFn = score_response):
        self.fn = fn
        self._errors = 0
        self._first: Optional[str] = None

    def __call__(self, response: str, truth: str) -> Score:
        try:
            value = self.fn(response, truth)
            parts = tuple(value) if isinstance(value, Score) else (value,)
            if not all(isinstance(v, numbers.Real) for v in parts):  # text is never parsed: "1.0" scores 0
                raise TypeError(f"expected a number or a Score of numbers, got {value!r}"[:200])
            if not all(abs(float(v)) <= _FLOAT32_MAX for v in parts):  # NaN, inf, and what overflows float32
                raise ValueError(f"score {tuple(float(v) for v in parts)} is not a finite float32 number")
            reward = float(parts[0])
            return Score(*(float(v) for v in value)) if isinstance(value, Score) else Score(
                reward, float(reward > FORMAT_WEIGHT), 0.0)
        except Exception as error:  # a verifier bug must not kill a long run: count it, score 0
            self._errors += 1
            if self._first is None:
                self._first = f"{type(error).__name__}: {error}"[:300]
            return Score(0.0, 0.0, 0.0)

    def take_errors(self) -> Tuple[int, Optional[str]]:
        errors, first = self._errors, self._first
        self._errors, self._first = 0, None
        return errors, first
