"""The verifier and format reward (calibrl.rewards) on edge cases."""

import pytest

from calibrl.rewards import FORMAT_WEIGHT, extract_answer, format_reward, normalize_answer, score_response


@pytest.mark.parametrize("response, expected", [
    ("<think>x</think><answer>blue</answer>", "blue"),
    ("<answer>  blue \n</answer>", "blue"),  # whitespace around the answer dropped
    ("<answer>red</answer> then <answer>blue</answer>", "red"),  # the FIRST answer counts
    ("<answer>\nlight blue\n</answer>", "light blue"),
    ("<answer></answer>", ""),
    ("no tags at all", None),
    ("<answer>blue", None),  # unclosed
    ("blue</answer>", None),
    ("<ANSWER>blue</ANSWER>", None),  # tags are case-sensitive, as in the authors' regex
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("raw, normal", [
    ("Blue", "blue"), ("  blue  ", "blue"), ("blue.", "blue"), ("light   blue", "light blue"), ("'yes'!", "yes"),
    ("Yes,", "yes"), ("", ""),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("response, fmt", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>a</think> so <answer>b</answer>\n", 1.0),  # outer whitespace stripped, text between allowed
    ("<think>line1\nline2</think>\n<answer>b</answer>", 1.0),  # dot matches newline
    ("<think></think><answer></answer>", 1.0),
    ("<answer>b</answer>", 0.0),  # missing think
    ("<think>a</think>", 0.0),  # missing answer
    ("<think>a</think><answer>b</answer> trailing", 0.0),  # full match required
    ("prefix <think>a</think><answer>b</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a<answer>b</answer>", 0.0),  # unclosed think
])
def test_format_reward(response, fmt):
    assert format_reward(response) == fmt


def test_score_combines_accuracy_and_format():
    full = score_response("<think>i see a red circle.</think><answer>Red</answer>", "red")
    assert full.accuracy == 1.0 and full.format == 1.0 and full.reward == pytest.approx(1.0 + FORMAT_WEIGHT)
    wrong = score_response("<think>hmm</think><answer>blue</answer>", "red")
    assert wrong == (pytest.approx(FORMAT_WEIGHT), 0.0, 1.0)
    unformatted = score_response("the answer is <answer>red</answer>", "red")
    assert unformatted == (1.0, 1.0, 0.0)
    several = score_response("<think>t</think><answer>blue</answer><answer>red</answer>", "red")
    assert several.accuracy == 0.0  # only the first answer is graded
    assert score_response("red", "red").reward == 0.0  # no tags, no credit


def test_pass_threshold_separates_correct_rows():
    """A row passes when r > 0.1: exactly the correct ones, whatever their format."""
    rewards = [score_response(r, "red").reward for r in (
        "<think>t</think><answer>red</answer>", "<answer>red</answer>", "<think>t</think><answer>no</answer>", "x")]
    assert [r > 0.1 for r in rewards] == [True, True, False, False]


def test_guarded_scorer_scores_faults_zero_and_counts_them():
    import numpy as np

    from calibrl.rewards import GuardedScorer, Score

    FAULTY = {  # response -> what the verifier returns; all but np, int and f32max score 0 and count as errors
        "nan": float("nan"), "inf": float("-inf"), "text": "not a number", "numeric text": "1.0",
        "bytes": b"1.0", "none": None, "list": [1.0], "overflows float32": 1e39, "just above": 3.5e38,
        "text score": Score("1.1", 1.0, 1.0), "overflowing score": Score(1.0, 1e39, 0.0),
        "np": np.float32(0.5), "int": 1, "f32max": 3.4028234663852886e38,
    }

    def verifier(response, truth):
        if response == "boom":
            raise RuntimeError("bug")
        if response == "nan":
            return float("nan")
        if response in FAULTY:
            return FAULTY[response]
        return 1.0 if response == truth else 0.05

    scorer = GuardedScorer(verifier)
    assert scorer("a", "a") == Score(1.0, 1.0, 0.0)  # a float reward counts as correct above 0.1
    assert scorer("b", "a") == Score(0.05, 0.0, 0.0)
    assert scorer("np", "a") == Score(0.5, 1.0, 0.0) and scorer("int", "a") == Score(1.0, 1.0, 0.0)
    assert scorer("f32max", "a").reward == 3.4028234663852886e38  # the largest float32 is still a number
    for bad in ("boom", *(k for k in FAULTY if k not in ("np", "int", "f32max"))):
        assert scorer(bad, "a") == Score(0.0, 0.0, 0.0), bad
    errors, first = scorer.take_errors()
    assert errors == 1 + len(FAULTY) - 3 and first == "RuntimeError: bug"
    assert scorer.take_errors() == (0, None)
    assert GuardedScorer()("<think>x</think><answer>red</answer>", "red") == Score(1.1, 1.0, 1.0)
