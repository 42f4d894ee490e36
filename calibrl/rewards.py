"""The verifier and the reward: r = accuracy + 0.1 * format. Two parsers (``--reward-format``):

strict (``score_response``, the trainer's default):
- format: 1 when the response is exactly one ``<think>...</think>`` block followed by one
  ``<answer>...</answer>`` block, with nothing before, between or after them but whitespace, and no
  think / answer tag inside a block; a response cut at max_new_tokens (no end token) fails the format
  (the trainer applies that rule, see ``score_all``); ``format_violation`` names why a response fails;
- accuracy: 1 when the response has that format and the content of its answer block equals the ground
  truth after ``normalize_answer``: a malformed response earns nothing, so repeating or appending tags
  (``...</answer></answer>``) cannot keep the reward of a correct first answer.
authors (``score_response_authors``, docs/method.md "Reward parsing", the authors' code):
- answer: the content of the FIRST ``<answer>...</answer>`` (surrounding whitespace dropped);
- accuracy: 1 when that answer equals the ground truth after ``normalize_answer``, else 0;
- format: 1 when the whole response (outer whitespace stripped) matches
  ``<think>.*?</think>.*?<answer>.*?</answer>`` with "." matching newlines, else 0 (lazy: trailing tags
  and repeated blocks pass); truncation is not looked at.
A row passes (is correct) when r > 0.1, i.e. exactly when accuracy is 1.

``--reward-fn package.module:function`` replaces ``score_response`` with your own verifier; every call goes
through ``GuardedScorer``, so a verifier that raises on one sample scores that sample 0 and the step goes on
(the count is logged as ``reward_errors``, the first message printed).
"""

from __future__ import annotations

import numbers
import re
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

ANSWER_PATTERN = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT_PATTERN = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
TAG_PATTERN = re.compile(r"</?(?:think|answer)>")
_BLOCK_TEXT = r"(?:(?!</?(?:think|answer)>).)*"  # block content: any text holding no think / answer tag
STRICT_PATTERN = re.compile(rf"\s*<think>{_BLOCK_TEXT}</think>\s*<answer>({_BLOCK_TEXT})</answer>\s*", re.DOTALL)
STRICT_TAG_ORDER = ["<think>", "</think>", "<answer>", "</answer>"]
# why a response fails the strict format, in the order format_violation checks them
FORMAT_VIOLATIONS = (
    "truncated",
    "missing_think",
    "missing_answer",
    "extra_tags",
    "misordered",
    "text_before",
    "text_between",
    "text_after",
)
REWARD_FORMATS = ("strict", "authors")
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


def score_response_authors(response: str, truth: str) -> Score:
    """The authors' reward of one response and its two parts (first answer, lazy format)."""
    accuracy = accuracy_reward(response, truth)
    form = format_reward(response)
    return Score(accuracy + FORMAT_WEIGHT * form, accuracy, form)


def strict_answer(response: str) -> Optional[str]:
    """The answer block's content (whitespace dropped) when the response has the strict format, else None."""
    match = STRICT_PATTERN.fullmatch(response)
    return match.group(1).strip() if match else None


def format_violation(response: str, truncated: bool = False) -> Optional[str]:
    """None when the response has the strict format, else the first of ``FORMAT_VIOLATIONS`` it shows."""
    if truncated:
        return "truncated"
    if STRICT_PATTERN.fullmatch(response):
        return None
    tags = TAG_PATTERN.findall(response)
    if "<think>" not in tags or "</think>" not in tags:
        return "missing_think"
    if "<answer>" not in tags or "</answer>" not in tags:
        return "missing_answer"
    if len(tags) > len(STRICT_TAG_ORDER):
        return "extra_tags"  # repeated blocks, nested blocks, trailing tags
    if tags != STRICT_TAG_ORDER:
        return "misordered"  # e.g. the answer block inside the think block, or answer first
    before, rest = response.split("<think>", 1)
    between = rest.split("</think>", 1)[1].split("<answer>", 1)[0]
    if before.strip():
        return "text_before"
    return "text_between" if between.strip() else "text_after"


def score_response(response: str, truth: str) -> Score:
    """The strict reward of one response and its two parts (the module docstring)."""
    answer = strict_answer(response)
    if answer is None:
        return Score(0.0, 0.0, 0.0)
    accuracy = 1.0 if normalize_answer(answer) == normalize_answer(truth) else 0.0
    return Score(accuracy + FORMAT_WEIGHT, accuracy, 1.0)


RewardFn = Callable[[str, str], Union[Score, float]]  # (response, ground truth) -> Score or a reward
SCORERS = {"strict": score_response, "authors": score_response_authors}
TRUNCATED_SCORE = Score(0.0, 0.0, 0.0)  # a response cut at max_new_tokens, under truncation_fails


def score_all(
    scorer: Callable[[str, str], Score],
    texts: Sequence[str],
    truths: Sequence[str],
    truncated: Sequence[bool],
    truncation_fails: bool,
) -> List[Score]:
    """The score of every response; with ``truncation_fails`` (strict format) a response cut at
    max_new_tokens scores ``TRUNCATED_SCORE`` (a format failure) without calling the verifier."""
    if not len(texts) == len(truths) == len(truncated):
        raise ValueError(
            f"score_all: texts, truths and truncated must have one entry per response, got "
            f"{len(texts)}, {len(truths)} and {len(truncated)}"
        )
    return [
        TRUNCATED_SCORE if cut and truncation_fails else scorer(text, truth)
        for text, truth, cut in zip(texts, truths, truncated)
    ]


def load_reward_fn(spec: Optional[str], reward_format: str = "strict") -> RewardFn:
    """The built-in verifier of ``reward_format`` ("strict" or "authors"), or the function named by
    ``spec`` ("package.module:function").

    The function takes (response, ground truth) and returns a ``Score`` or a number (the reward; the row
    then counts as correct when the reward exceeds FORMAT_WEIGHT, and its format as 0).
    """
    if reward_format not in REWARD_FORMATS:
        raise ValueError(f"reward_format: expected one of {REWARD_FORMATS}, got {reward_format!r}")
    return SCORERS[reward_format] if spec is None else load_function(spec, "reward_fn")


def load_function(spec: str, setting: str) -> Callable:
    """The function named by ``spec`` ("package.module:function"); ValueError naming ``setting`` otherwise."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{setting}: expected 'package.module:function', got {spec!r}")
    import importlib

    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{setting}: cannot load {spec!r}: {error}") from error
    if not callable(fn):
        raise ValueError(f"{setting}: {spec!r} is a {type(fn).__name__}, not a function")
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
            return (
                Score(*(float(v) for v in value))
                if isinstance(value, Score)
                else Score(reward, float(reward > FORMAT_WEIGHT), 0.0)
            )
        except Exception as error:  # a verifier bug must not kill a long run: count it, score 0
            self._errors += 1
            if self._first is None:
                self._first = f"{type(error).__name__}: {error}"[:300]
            return Score(0.0, 0.0, 0.0)

    def take_errors(self) -> Tuple[int, Optional[str]]:
        errors, first = self._errors, self._first
        self._errors, self._first = 0, None
        return errors, first
