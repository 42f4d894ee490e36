"""The verifier and format reward (calibrl.rewards) on edge cases: the strict parser (the trainer's default)
and the authors' first-match / lazy parser (docs/method.md "Reward parsing")."""

import pytest

from calibrl.rewards import (
    FORMAT_VIOLATIONS,
    FORMAT_WEIGHT,
    TRUNCATED_SCORE,
    Score,
    extract_answer,
    format_reward,
    format_violation,
    load_reward_fn,
    normalize_answer,
    score_all,
    score_response,
    score_response_authors,
    strict_answer,
)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>x</think><answer>blue</answer>", "blue"),
        ("<answer>  blue \n</answer>", "blue"),  # whitespace around the answer dropped
        ("<answer>red</answer> then <answer>blue</answer>", "red"),  # the FIRST answer counts
        ("<answer>\nlight blue\n</answer>", "light blue"),
        ("<answer></answer>", ""),
        ("no tags at all", None),
        ("<answer>blue", None),  # unclosed
        ("blue</answer>", None),
        ("<ANSWER>blue</ANSWER>", None),  # tags are case-sensitive, as in the authors' regex
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Blue", "blue"),
        ("  blue  ", "blue"),
        ("blue.", "blue"),
        ("light   blue", "light blue"),
        ("'yes'!", "yes"),
        ("Yes,", "yes"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    "response, fmt",
    [
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
    ],
)
def test_format_reward(response, fmt):
    assert format_reward(response) == fmt


def test_authors_score_combines_accuracy_and_format():
    full = score_response_authors("<think>i see a red circle.</think><answer>Red</answer>", "red")
    assert full.accuracy == 1.0 and full.format == 1.0 and full.reward == pytest.approx(1.0 + FORMAT_WEIGHT)
    wrong = score_response_authors("<think>hmm</think><answer>blue</answer>", "red")
    assert wrong == (pytest.approx(FORMAT_WEIGHT), 0.0, 1.0)
    unformatted = score_response_authors("the answer is <answer>red</answer>", "red")
    assert unformatted == (1.0, 1.0, 0.0)
    several = score_response_authors("<think>t</think><answer>blue</answer><answer>red</answer>", "red")
    assert several.accuracy == 0.0  # only the first answer is graded
    assert score_response_authors("red", "red").reward == 0.0  # no tags, no credit
    # the loophole of the lazy match: trailing tags keep the full reward
    assert score_response_authors(
        "<think>t</think><answer>red</answer></answer></answer>", "red"
    ).reward == pytest.approx(1.0 + FORMAT_WEIGHT)


def test_authors_pass_threshold_separates_correct_rows():
    """A row passes when r > 0.1: exactly the correct ones, whatever their format."""
    rewards = [
        score_response_authors(r, "red").reward
        for r in (
            "<think>t</think><answer>red</answer>",
            "<answer>red</answer>",
            "<think>t</think><answer>no</answer>",
            "x",
        )
    ]
    assert [r > 0.1 for r in rewards] == [True, True, False, False]


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<think>i see a red circle.</think><answer>red circle</answer>", "red circle"),
        ("  <think>a</think>\n <answer> Red </answer>\n", "Red"),  # whitespace around and between blocks
        ("<think>line1\nline2</think><answer>b</answer>", "b"),
        ("<think></think><answer></answer>", ""),  # empty blocks are a format, not an answer
        ("<think>1 < 2 and a > b</think><answer>x</answer>", "x"),  # angle brackets that are no tags
    ],
)
def test_strict_accepts_one_think_then_one_answer(response, answer):
    assert format_violation(response) is None and strict_answer(response) == answer
    assert score_response(response, answer).format == 1.0


@pytest.mark.parametrize(
    "response, reason",
    [
        ("<think>t</think><answer>red</answer></answer></answer>", "extra_tags"),  # trailing tags
        ("<think>t</think><answer>red</answer><answer>red</answer>", "extra_tags"),  # repeated answer blocks
        ("<think>t</think><think>u</think><answer>red</answer>", "extra_tags"),  # repeated think blocks
        ("<think>a<think>b</think></think><answer>red</answer>", "extra_tags"),  # nested think
        ("<think>t</think><answer><answer>red</answer></answer>", "extra_tags"),  # nested answer
        ("<think>t<answer>red</answer></think>", "misordered"),  # answer inside think (one tag of each)
        ("<answer>red</answer><think>t</think>", "misordered"),  # answer first
        ("<answer>red</answer>", "missing_think"),
        ("i think so <answer>red</answer>", "missing_think"),
        ("<think>t</think>red", "missing_answer"),
        ("<think>t</think><answer>red", "missing_answer"),  # unclosed answer
        ("<think>t</think><answer>red</answer> and more", "text_after"),
        ("<think>t</think><answer>red</answer>red", "text_after"),
        ("so <think>t</think><answer>red</answer>", "text_before"),
        ("<think>t</think> so <answer>red</answer>", "text_between"),  # the authors' pattern allows this
    ],
)
def test_strict_rejects_each_shape_and_names_it(response, reason):
    assert reason in FORMAT_VIOLATIONS
    assert format_violation(response) == reason
    assert strict_answer(response) is None
    assert score_response(response, "red") == Score(0.0, 0.0, 0.0)  # a malformed response earns nothing


def test_strict_truncation_is_a_format_failure():
    text = "<think>t</think><answer>red</answer>"  # well formed, but cut before the end token
    assert format_violation(text, truncated=True) == "truncated"
    assert score_all(score_response, [text, text], ["red", "red"], [False, True], truncation_fails=True) == [
        Score(1.0 + FORMAT_WEIGHT, 1.0, 1.0),
        TRUNCATED_SCORE,
    ]
    # the authors' setting ignores truncation
    assert score_all(score_response_authors, [text], ["red"], [True], truncation_fails=False) == [
        Score(1.0 + FORMAT_WEIGHT, 1.0, 1.0)
    ]
    with pytest.raises(ValueError, match="one entry per response"):
        score_all(score_response, [text], ["red"], [True, False], truncation_fails=True)


def test_strict_scores_accuracy_from_the_single_answer_block():
    assert score_response("<think>t</think><answer>Red.</answer>", "red") == Score(1.0 + FORMAT_WEIGHT, 1.0, 1.0)
    assert score_response("<think>t</think><answer>blue</answer>", "red") == Score(FORMAT_WEIGHT, 0.0, 1.0)
    rewards = [
        score_response(r, "red").reward
        for r in (
            "<think>t</think><answer>red</answer>",
            "<answer>red</answer>",
            "<think>t</think><answer>no</answer>",
            "x",
        )
    ]
    assert [r > 0.1 for r in rewards] == [True, False, False, False]  # passing needs the strict format


def test_load_reward_fn_picks_the_parser():
    assert load_reward_fn(None) is score_response
    assert load_reward_fn(None, "authors") is score_response_authors
    assert load_reward_fn("calibrl.rewards:score_response_authors") is score_response_authors
    with pytest.raises(ValueError, match="reward_format: expected one of"):
        load_reward_fn(None, "lenient")
    with pytest.raises(ValueError, match="reward_fn: expected 'package.module:function'"):
        load_reward_fn("calibrl.rewards")


def test_guarded_scorer_scores_faults_zero_and_counts_them():
    import numpy as np

    from calibrl.rewards import GuardedScorer, Score

    FAULTY = {  # response -> what the verifier returns; all but np, int and f32max score 0 and count as errors
        "nan": float("nan"),
        "inf": float("-inf"),
        "text": "not a number",
        "numeric text": "1.0",
        "bytes": b"1.0",
        "none": None,
        "list": [1.0],
        "overflows float32": 1e39,
        "just above": 3.5e38,
        "text score": Score("1.1", 1.0, 1.0),
        "overflowing score": Score(1.0, 1e39, 0.0),
        "np": np.float32(0.5),
        "int": 1,
        "f32max": 3.4028234663852886e38,
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
