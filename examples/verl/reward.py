"""Reward for verl's `reward.custom_reward_function.path`: accuracy + 0.1 * format (docs/method.md).

verl calls compute_score(data_source, solution_str, ground_truth, extra_info) once per row, expert rows
included (they are scored like any rollout).
"""

import re

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
FORMAT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    match = ANSWER.search(solution_str)
    accuracy = float(match is not None and _normalise(match.group(1)) == _normalise(str(ground_truth)))
    fmt = float(FORMAT.fullmatch(solution_str.strip()) is not None)
    return accuracy + 0.1 * fmt
