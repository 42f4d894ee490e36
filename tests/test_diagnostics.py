"""Exploration metrics (calibrl.exploration) and the guide-regime diagnostics (calibrl.diagnostics).

The gradient diagnostics are checked against an independent computation: the torch reference loss on
explicit logits, its guide term differentiated on its own.
"""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from calibrl import algorithms  # noqa: E402
from calibrl.config import parse_config  # noqa: E402
from calibrl.data import load_examples  # noqa: E402
from calibrl.diagnostics import guide_gradients, guide_regime, z_regime  # noqa: E402
from calibrl.distributed import DistInfo  # noqa: E402
from calibrl.evaluate import evaluate  # noqa: E402
from calibrl.exploration import (
    NO_ANSWER,
    answer_class,
    answer_token_mask,
    distinct_answers,
    pass_at_k,  # noqa: E402
    rollout_exploration,
    token_char_spans,
)
from calibrl.model import PolicyForward, build_tiny_policy  # noqa: E402
from calibrl.rewards import FORMAT_VIOLATIONS  # noqa: E402
from calibrl.rollout import collect_rollouts, old_logprobs  # noqa: E402
from calibrl_kernels import CalibRLConfig, reference  # noqa: E402

CPU = torch.device("cpu")
ONE = DistInfo(0, 1, CPU)


@pytest.fixture(scope="module")
def policy():
    cfg = parse_config(["--quick", "--hidden-size", "32", "--num-heads", "2", "--dtype", "fp32"])
    examples = load_examples("easy-vqa", "train", 64)
    return build_tiny_policy(cfg, [t for e in examples for t in (e.question, e.expert)] + ["user\n", "assistant\n"])


# ------------------------------------------------------------------------------------- exploration
@pytest.mark.parametrize("n, k", [(8, 8), (10, 8), (12, 3), (5, 1)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n, k):
    for c in range(n + 1):
        subsets = list(itertools.combinations(range(n), k))  # samples 0 .. c-1 are the correct ones
        expected = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(4, 1, 8)


def test_distinct_answers_count_normalised_answers_and_no_answer_once():
    responses = [
        "<think>a</think><answer>Red circle</answer>",
        "<answer>red circle.</answer> junk",
        "<think>b</think><answer>blue circle</answer>",
        "no tags",
        "also none",
    ]
    assert answer_class(responses[1]) == "red circle" and answer_class(responses[3]) == NO_ANSWER
    assert distinct_answers(responses) == 3


def test_answer_tokens_are_the_tokens_of_the_answer_text(policy):
    text = "<think>i see a red circle.</think><answer>red circle</answer>"
    tokens = policy.encode_response(text)  # ends with the end token (decoded as "")
    spans = token_char_spans(policy.decode_response, tokens)
    assert spans[-1][1] == len(text) and [b - a for a, b in spans[-1:]] == [0]
    ids = torch.tensor([tokens + [policy.pad_token_id] * 3])
    mask = torch.tensor([[1.0] * len(tokens) + [0.0] * 3])
    picked = answer_token_mask(policy.decode_response, ids, mask, [text])[0]
    answer_text = policy.decode_response([t for t, keep in zip(tokens, picked[: len(tokens)].tolist()) if keep])
    assert "red circle" in answer_text and "think" not in answer_text and not picked[len(tokens) :].any()
    assert not answer_token_mask(policy.decode_response, ids, mask, ["<think>x</think>"]).any()


def test_rollout_exploration_sums_entropy_per_response():
    decode = lambda ids: "".join(chr(97 + i) for i in ids)  # noqa: E731 one character per token
    texts = ["<answer>b</answer>", "plain", "expert"]
    ids = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros(3, 20)
    for row, text in enumerate(texts):  # tokens whose decoded characters are the text's
        ids[row, : len(text)] = torch.tensor([ord(ch) - 97 for ch in text])
        mask[row, : len(text)] = 1.0
    entropy = torch.rand(3, 20) * mask
    batch = SimpleNamespace(
        is_expert=torch.tensor([False, False, True]),
        response_mask=mask,
        response_ids=ids,
        texts=texts,
        truncated=torch.tensor([False, True, False]),
        token_entropy=entropy,
    )
    metrics = rollout_exploration(batch, decode, ONE)
    assert metrics["response_entropy"] == pytest.approx(float(entropy[:2].sum()) / 2)
    assert metrics["answer_rows"] == 0.5
    assert metrics["answer_entropy"] == pytest.approx(float(entropy[0, 8]))  # the single answer character "b"
    assert metrics["format_failures"]["missing_think"] == 0.5 and metrics["format_failures"]["truncated"] == 0.5


def test_evaluate_draws_k_samples_per_question(policy):
    examples = load_examples("easy-vqa", "test", 5)

    def attributes(response, truth):
        return {"says_yes": float("yes" in response)}

    results, shown = evaluate(policy, examples, 6, 4, 1.0, ONE, samples=8, extra_metrics=attributes)
    assert {
        "eval_accuracy",
        "eval_sampled_accuracy",
        "eval_pass_at_8",
        "eval_distinct_answers",
        "eval_truncated",
        "eval_sampled_truncated",
        "eval_says_yes",
        "eval_sampled_says_yes",
    } <= set(results)
    assert 1.0 <= results["eval_distinct_answers"] <= 8.0
    assert results["eval_pass_at_8"] >= results["eval_sampled_accuracy"]
    assert len(shown) == 5
    single, _ = evaluate(policy, examples, 6, 4, 1.0, ONE, samples=1)
    assert "eval_pass_at_8" not in single and "eval_distinct_answers" not in single
    assert single["eval_accuracy"] == results["eval_accuracy"]  # greedy answers do not depend on samples


# -------------------------------------------------------------------------------------- guide regime
def test_z_regime_counts_each_side_of_the_bend():
    # rows: passed on-policy, failed on-policy, a zero-advantage row (no guide weight), the expert row
    old_logp = torch.tensor([[-1.0, -3.0, -0.5], [-1.0, -3.0, 0.0], [-9.0, -9.0, -9.0], [-2.0, -2.0, -2.0]])
    batch = SimpleNamespace(
        old_logp=old_logp,
        baseline=torch.full((4, 3), -2.0),
        baseline_mask=torch.tensor([[True, True, False]] * 4),
        response_mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
        passed=torch.tensor([True, False, False, True]),
        is_expert=torch.tensor([False, False, False, True]),
        advantages=torch.tensor([0.5, -0.5, 0.0, 0.5]),
    )
    metrics = z_regime(batch, CalibRLConfig(), ONE)
    # passed row: lp - b = +1, -1, +1.5 -> z = -1, +1, -1.5; failed row: lp - b = +1, -1 -> z = +1, -1
    assert metrics["guide_z_pos_passed"] == pytest.approx(1 / 3)
    assert metrics["guide_z_neg_passed"] == pytest.approx(2 / 3)
    assert metrics["guide_z_pos_failed"] == 0.5 and metrics["guide_z_neg_failed"] == 0.5
    assert metrics["guide_gap_passed"] == pytest.approx(0.5) and metrics["guide_gap_failed"] == 0.0
    assert metrics["guide_tokens"] == pytest.approx(5 / 8)  # the zero-advantage row's 3 tokens are not guided
    masked = z_regime(batch, CalibRLConfig(mask_beyond_expert=True), ONE)
    assert masked["guide_z_neg_passed"] == 0.5  # the third token lies past the expert's length
    unweighted = z_regime(batch, CalibRLConfig(weight_by_advantage=False), ONE)
    # the zero-advantage row (lp - b = -7, z = -7 < 0) now counts among the failed rows
    assert unweighted["guide_tokens"] == 1.0 and unweighted["guide_z_pos_failed"] == pytest.approx(1 / 5)


def _scored_batch(policy, loss):
    torch.manual_seed(0)
    examples = load_examples("easy-vqa", "train", 2)
    batch = collect_rollouts(policy, examples, [0, 1], 3, 6, 1.0)
    forward = PolicyForward(policy)
    batch.old_logp = old_logprobs(forward, batch, 1.0, 0)
    batch.rewards = torch.tensor([1.1, 0.0, 0.1, 1.1, 1.1, 1.1, 0.0, 1.1])  # mixed outcomes, experts 1.1
    stats = algorithms.group_statistics(batch.rewards, batch.group_ids, batch.is_expert, loss)
    batch.advantages, batch.passed = stats.advantages.float(), stats.passed
    batch.baseline, batch.baseline_mask = algorithms.expert_baseline(
        batch.old_logp, batch.response_mask, batch.group_ids, batch.is_expert, loss
    )
    return forward, batch


def test_guide_gradients_match_the_reference_guide_term(policy):
    loss = CalibRLConfig.for_algo("calibrl", guide_coef=0.3)
    forward, batch = _scored_batch(policy, loss)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    rng = torch.get_rng_state()
    metrics = guide_gradients(forward, batch, loss, 3, ONE)  # micro-batches of 3 rows
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in params)

    # independent: explicit logits, the reference loss's PPO and guide terms differentiated separately
    hidden, weight, bias = forward(**batch.forward_inputs(CPU))
    logits = reference.linear_logits(hidden, weight, bias)  # (B, T, V)
    targets = batch.targets()
    read = targets != algorithms.IGNORE_INDEX
    logp = reference.token_logprobs(logits, targets, 1.0, algorithms.IGNORE_INDEX)
    on = (~batch.is_expert)[:, None] & read  # (B, T) on-policy tokens
    adv = batch.advantages[:, None].expand_as(logp)
    l_pg, _, _ = reference.ppo_token_terms(logp, batch.old_logp, adv, loss)
    z = -torch.where(batch.passed, 1.0, -1.0)[:, None] * (logp - batch.baseline)
    guide_term = adv.abs() * reference.guide_activation(z, loss)
    mean = lambda values: (values * on).sum() / on.sum()  # noqa: E731 token-mean over on-policy tokens
    g_pg = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean(l_pg), params, retain_graph=True)])
    g_guide = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss.guide_coef * mean(guide_term), params)])
    assert metrics["pg_grad_norm"] == pytest.approx(float(g_pg.norm()), rel=1e-4)
    assert metrics["guide_grad_norm"] == pytest.approx(float(g_guide.norm()), rel=1e-4)
    assert metrics["guide_grad_ratio"] == pytest.approx(float(g_guide.norm() / g_pg.norm()), rel=1e-4)
    cos = float(torch.dot(g_pg, g_guide) / (g_pg.norm() * g_guide.norm()))
    assert metrics["guide_grad_cos"] == pytest.approx(cos, abs=1e-4)


def test_guide_regime_skips_gradients_without_a_guide(policy):
    loss = CalibRLConfig.for_algo("grpo")
    forward, batch = _scored_batch(policy, loss)
    metrics = guide_regime(forward, batch, loss, 0, ONE)
    assert "guide_z_pos_passed" in metrics and "pg_grad_norm" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())


# ------------------------------------------------------------------------------------------- trainer
def test_trainer_logs_exploration_and_guide_regime(tmp_path):
    from _train_helpers import all_finite, quick_run, rl_records

    out = tmp_path / "run"
    assert (
        quick_run(
            out,
            "--max-steps",
            3,
            "--diagnostics-every",
            2,
            "--eval-samples",
            8,
            "--eval-metrics",
            "calibrl.study.tasks:attribute_scores",
        )
        == 0
    )
    records = rl_records(out)
    for record in records:
        assert (
            all_finite(record)
            and record["response_entropy"] > 0
            and set(record["format_failures"]) == set(FORMAT_VIOLATIONS)
        )
        assert {"eval_pass_at_8", "eval_distinct_answers", "eval_color", "eval_sampled_shape"} <= set(record)
    diagnosed = [r["step"] for r in records if "guide_grad_ratio" in r]
    assert diagnosed == [1, 2]  # the first step, then every 2nd (scripted rewards: mixed groups)
    assert all(
        0 < r["guide_grad_ratio"] and -1 <= r["guide_grad_cos"] <= 1 and r["guide_tokens"] > 0
        for r in records
        if r["step"] in diagnosed
    )


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--reward-format", "lenient"], "reward_format"),
        (["--eval-samples", "0"], "eval_samples"),
        (["--diagnostics-every", "-1"], "diagnostics_every"),
    ],
)
def test_new_settings_are_checked_by_name(flags, error):
    from calibrl.config import ConfigError

    with pytest.raises(ConfigError, match=error):
        parse_config(["--quick", *flags])


def test_bad_eval_metrics_is_refused_by_name(tmp_path, capsys):
    from calibrl.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path / "bad"), "--eval-metrics", "not_a_module_xyz:f"])
    assert exit_info.value.code == 2 and "eval_metrics: cannot load" in capsys.readouterr().err
