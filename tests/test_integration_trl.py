"""CalibRLTrainer (TRL 1.16 GRPOTrainer subclass): real training steps on CPU, parity with calibrl_kernels,
per-row fields through TRL's shuffling/splitting, and clear errors on bad input.

Tiny models are built from configs and the tokenizer in memory (tests/_tiny_models.py): nothing is
downloaded. Each trainer run is 2 steps of a few rows with completions of at most 6 tokens.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'calibrl[trl]')")

from datasets import Dataset  # noqa: E402

import calibrl_kernels as ck  # noqa: E402
from calibrl import algorithms  # noqa: E402
from calibrl.integrations import _core  # noqa: E402
from calibrl.integrations.trl import CalibRLGRPOConfig, CalibRLTrainer, expert_text  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_models import char_tokenizer, tiny_causal_lm, tiny_qwen2_vl  # noqa: E402

CALIBRL_METRICS = ("pg_loss", "guide_loss", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl")


def text_reward(completions, answer, **kwargs):
    """Accuracy + a small diversity term, so that tiny random models get non-zero advantages."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip().startswith(a)) + 0.1 * len(set(t)) / 6 for t, a in zip(texts, answer)]


def text_dataset(expert=None, n=4):
    prompts = ["1+1=", "2+2=", "3+1=", "2+1="][:n]
    answers = ["2", "4", "4", "3"][:n]
    columns = {"prompt": prompts, "answer": answers}
    if expert is not False:
        columns["expert"] = expert if expert is not None else [a + " ok" for a in answers]
    return Dataset.from_dict(columns)


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
        learning_rate=1e-2, seed=0, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CalibRLGRPOConfig(**kwargs)


def make_text_trainer(tmp_path, dataset=None, **overrides):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(len(tokenizer))
    return CalibRLTrainer(
        model=model, reward_funcs=text_reward, args=make_args(tmp_path, **overrides),
        train_dataset=text_dataset() if dataset is None else dataset, processing_class=tokenizer,
    )


def assert_trains(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        for name in CALIBRL_METRICS:
            assert name in entry, f"metric {name} not logged: {sorted(entry)}"
        assert "reward" in entry and "calibrl/pass_rate" in entry  # TRL's metrics beside ours
    changed = sum(float((before[n] - p.detach()).abs().sum()) for n, p in trainer.model.named_parameters())
    assert changed > 0
    return logs


# ---------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy"])
def test_text_model_trains_and_logs(tmp_path, algo):
    logs = assert_trains(make_text_trainer(tmp_path, calibrl_algo=algo))
    if algo == "calibrl":
        assert any(entry["guide_loss"] != 0 for entry in logs)
    else:
        assert all(entry["guide_loss"] == 0 for entry in logs)


def test_accumulation_and_several_generation_steps(tmp_path):
    """steps_per_generation=2 splits each generated batch (with its expert rows) into 2 micro-batches."""
    assert_trains(make_text_trainer(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2))


def test_grpo_needs_no_expert_column(tmp_path):
    trainer = make_text_trainer(tmp_path, dataset=text_dataset(expert=False), calibrl_algo="grpo")
    assert_trains(trainer)
    with pytest.raises(ValueError, match="expert_column: calibrl_algo='grpo' uses no expert completions"):
        make_args(tmp_path, calibrl_algo="grpo", expert_column="expert")


def test_qwen2_vl_with_images_trains(tmp_path):
    from PIL import Image

    tokenizer = char_tokenizer()
    model, processor = tiny_qwen2_vl(tokenizer)
    colours = ["red", "blue", "green", "red"]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "What colour?"}]] * 4,
        "image": [Image.new("RGB", (56, 56), c) for c in colours],
        "expert": [[{"role": "assistant", "content": c}] for c in colours],
        "answer": colours,
    })
    trainer = CalibRLTrainer(
        model=model, reward_funcs=text_reward, args=make_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2),
        train_dataset=dataset, processing_class=processor,
    )
    logs = assert_trains(trainer)
    assert logs[0]["calibrl/expert_reward"] > 1.0  # the expert answers are correct: scored by the same reward


# ---------------------------------------------------------------------------------------------- parity
def generated_batch(trainer, rows=4):
    examples = [dict(trainer.train_dataset[i]) for i in range(rows // trainer.num_generations)]
    inputs = [example for example in examples for _ in range(trainer.num_generations)]
    trainer.model.train()
    return trainer._generate_and_score_completions(inputs)


@pytest.mark.parametrize("algo", ["calibrl", "rlplus"])
def test_loss_and_gradients_equal_the_slim_trainer_and_calibrl_kernels(tmp_path, algo):
    """With CalibRL's own setting (bnpo = the per-micro-batch token mean, A = r - mean, dual clip 3), one batch
    through TRL's compute_loss == the slim trainer's path (calibrl.algorithms: group statistics, expert baseline,
    policy loss) == calibrl_kernels called directly (scores + group ids path)."""
    trainer = make_text_trainer(tmp_path, calibrl_algo=algo, gradient_accumulation_steps=1)
    batch = generated_batch(trainer)
    model = trainer.model
    config = trainer.calibrl_config
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in params]

    def hidden_and_old():
        # hidden states from the model body, at the positions that predict the completion tokens
        T = batch["completion_ids"].size(1)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -T - 1:-1]
        with torch.no_grad():
            old = ck.linear_token_logprobs(hidden, model.lm_head.weight, batch["completion_ids"], temperature=config.temperature)
        return hidden, old

    assert config.loss_agg_mode == "token-mean" and not config.norm_by_std and config.dual_clip_c == 3.0
    scores, group_ids = batch[_core.FIELD_SCORES], batch[_core.FIELD_GROUP_IDS]
    is_expert, mask = batch[_core.FIELD_IS_EXPERT], batch["completion_mask"]

    def slim_trainer_path():
        hidden, old = hidden_and_old()
        stats = algorithms.group_statistics(scores, group_ids, is_expert, config)
        baseline, baseline_mask = algorithms.expert_baseline(old, mask, group_ids, is_expert, config)
        return algorithms.policy_loss(hidden, model.lm_head.weight, None, batch["completion_ids"], old, stats.advantages,
                                      mask, stats.passed, is_expert, baseline, baseline_mask, config).loss

    def direct_path():
        hidden, old = hidden_and_old()
        return ck.fused_linear_calibrl_loss(hidden, model.lm_head.weight, batch["completion_ids"], old, None, mask,
                                            scores=scores, group_ids=group_ids, is_expert=is_expert, config=config).loss

    loss_trl, grads_trl = loss_and_grads(lambda: trainer.compute_loss(model, batch))
    for other in (slim_trainer_path, direct_path):
        loss_other, grads_other = loss_and_grads(other)
        torch.testing.assert_close(loss_trl, loss_other, rtol=1e-5, atol=1e-7)
        for g_trl, g_other in zip(grads_trl, grads_other):
            torch.testing.assert_close(g_trl, g_other, rtol=1e-4, atol=1e-7)
    assert loss_trl.item() != 0.0


def test_row_fields_survive_trl_shuffle_and_split(tmp_path):
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    trainer = make_text_trainer(tmp_path)
    batch = generated_batch(trainer)
    B = batch["completion_ids"].size(0)
    assert B == 6 and int(batch[_core.FIELD_IS_EXPERT].sum()) == 2  # 2 groups x (2 on-policy + 1 expert)
    tokenizer = trainer.processing_class
    expected_expert = {int(g): text for g, text in zip(batch[_core.FIELD_GROUP_IDS][-2:], ["2 ok", "4 ok"])}
    torch.manual_seed(1)
    chunks = split_tensor_dict(shuffle_sequence_dict(batch), 2)
    assert sum(c["completion_ids"].size(0) for c in chunks) == B
    for chunk in chunks:
        for i in range(chunk["completion_ids"].size(0)):
            group = int(chunk[_core.FIELD_GROUP_IDS][i])
            if chunk[_core.FIELD_IS_EXPERT][i]:  # the row's own completion is its group's expert text
                ids = chunk["completion_ids"][i][chunk["completion_mask"][i].bool()]
                assert tokenizer.decode(ids, skip_special_tokens=True) == expected_expert[group]
            else:  # an on-policy row carries its group's expert baseline
                assert chunk[_core.FIELD_EXPERT_LOGP][i].abs().sum() > 0
        out = trainer.calibrl_loss_output(trainer.model, chunk)
        assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------- config
def test_config_resolution_and_cli_fields(tmp_path):
    # unset TRL fields: CalibRL's setting in the expert modes, TRL's defaults in grpo mode
    calibrl = make_args(tmp_path, calibrl_guide_coef=0.3, epsilon=0.1, epsilon_high=0.28)
    assert (calibrl.algo, calibrl.loss_type, calibrl.scale_rewards, calibrl.delta, calibrl.expert_column) == (
        "calibrl", "bnpo", "none", 3.0, "expert")
    cfg = calibrl.calibrl_config
    assert (cfg.mode, cfg.guide_coef, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c) == ("calibrl", 0.3, 0.1, 0.28, 3.0)
    grpo = make_args(tmp_path, calibrl_algo="grpo")
    assert (grpo.loss_type, grpo.scale_rewards, grpo.delta, grpo.expert_column) == ("dapo", "group", None, None)
    assert grpo.calibrl_config.dual_clip_c is None and grpo.calibrl_config.norm_by_std
    # TRL's fields keep their meaning: delta is the dual clip (inf: off), loss_type the normaliser
    assert make_args(tmp_path, delta=float("inf")).calibrl_config.dual_clip_c is None
    assert make_args(tmp_path, calibrl_algo="grpo", delta=2.5).calibrl_config.dual_clip_c == 2.5
    dr = make_args(tmp_path, loss_type="dr_grpo", max_completion_length=6).calibrl_config
    assert (dr.loss_agg_mode, dr.loss_scale_factor) == ("seq-mean-token-sum-norm", 6.0)
    explicit = make_args(tmp_path, calibrl=ck.CalibRLConfig(negative_slope=0.25))
    assert explicit.calibrl_config.negative_slope == 0.25
    assert explicit.to_dict()["calibrl"]["negative_slope"] == 0.25  # JSON-serialisable for loggers
    assert make_args(tmp_path, calibrl=ck.CalibRLConfig(mode="luffy")).algo == "luffy"
    with pytest.raises(ValueError, match=r"calibrl.clip_low: TRL's fields decide it here .* expected 0.2"):
        make_args(tmp_path, calibrl=ck.CalibRLConfig(clip_low=0.1))
    with pytest.raises(ValueError, match="calibrl: give the guide settings either as calibrl or as calibrl_"):
        make_args(tmp_path, calibrl=ck.CalibRLConfig(), calibrl_guide_coef=0.2)
    with pytest.raises(ValueError, match="activation"):
        make_args(tmp_path, calibrl_activation="gelu")
    with pytest.raises(ValueError, match=r"calibrl_algo: 'dapo' is a TRL loss type here; use calibrl_algo='grpo', "
                                         "loss_type='dapo'"):
        make_args(tmp_path, calibrl_algo="dapo")
    with pytest.raises(ValueError, match=r"delta: expected None, inf or a number >= 1 \+ epsilon_high = 1.28"):
        make_args(tmp_path, delta=1.1, epsilon_high=0.28)
    with pytest.raises(ValueError, match=r"loss_type: CalibRLTrainer computes TRL's loss types .* got 'cispo'"):
        make_args(tmp_path, loss_type="cispo")


def test_every_calibrl_field_has_help_text():
    import dataclasses as dc

    own = [f for f in dc.fields(CalibRLGRPOConfig) if f.name.startswith(("calibrl", "expert"))
           or f.name in ("loss_type", "scale_rewards", "delta")]
    assert len(own) >= 14
    for f in own:
        assert len(f.metadata.get("help", "")) > 30, f.name


def test_expert_text_forms():
    assert expert_text("a", "expert", 0) == "a"
    assert expert_text({"role": "assistant", "content": "b"}, "expert", 0) == "b"
    assert expert_text([{"role": "assistant", "content": [{"type": "text", "text": "c"}]}], "expert", 0) == "c"
    with pytest.raises(TypeError, match="expert: row 3 expected a string"):
        expert_text(5, "expert", 3)
    with pytest.raises(ValueError, match="expert: row 1 holds an empty"):
        expert_text("  ", "expert", 1)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_expert_column_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"expert_column: the train_dataset has no column 'expert'"):
        make_text_trainer(tmp_path, dataset=text_dataset(expert=False))


def test_missing_expert_value_fails_at_first_batch(tmp_path):
    trainer = make_text_trainer(tmp_path)
    inputs = [{"prompt": "1+1=", "answer": "2"}] * 2
    with pytest.raises(ValueError, match=r"expert_column: row 0 of the batch has no 'expert' value"):
        trainer._generate_and_score_completions(inputs)


def test_expert_longer_than_completion_limit_fails_at_first_batch(tmp_path):
    trainer = make_text_trainer(tmp_path, dataset=text_dataset(expert=["2", "a much too long expert", "4", "3"]))
    with pytest.raises(ValueError, match=r"expert: the expert completion of row \d+ has \d+ tokens, more than max_completion_length=6"):
        trainer.train()


def test_mode_needing_experts_without_column_fails(tmp_path):
    with pytest.raises(ValueError, match="expert_column: the train_dataset has no column 'expert'"):
        make_text_trainer(tmp_path, dataset=text_dataset(expert=False), calibrl_algo="luffy")


def test_groups_split_by_steps_per_generation_fail(tmp_path):
    # 4 rows x 3 steps = 12 rows = 6 groups of 2 -> 18 rows with experts: divisible by 3, fine; 4 x 2 with n=4:
    # 2 groups -> 10 rows, not divisible by steps_per_generation=4
    with pytest.raises(ValueError, match="steps_per_generation: the 2 prompt groups of 4 rows"):
        make_text_trainer(tmp_path, per_device_train_batch_size=2, num_generations=4, steps_per_generation=4,
                          gradient_accumulation_steps=4)


def test_unsupported_trl_options_fail(tmp_path):
    with pytest.raises(ValueError, match=r"beta: CalibRLTrainer supports only beta=0.0, got 0.1 \(CalibRLTrainer "
                                         "loads no reference model and has no KL penalty\)"):
        make_text_trainer(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="entropy_coef: CalibRLTrainer supports only entropy_coef=0.0, got 0.01 "
                                         r"\(TRL's entropy bonus; calibrl_entropy_coef is CalibRL's"):
        make_text_trainer(tmp_path, entropy_coef=0.01)
    with pytest.raises(ValueError, match="multi_objective_aggregation: mode 'luffy' trains expert rows"):
        make_text_trainer(tmp_path, calibrl_algo="luffy", multi_objective_aggregation="normalize_then_sum")


def test_group_without_on_policy_rows_fails():
    scores = torch.tensor([0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1])
    is_expert = torch.tensor([False, True, True])  # group 1 holds only its expert row
    with pytest.raises(ValueError, match="is_expert: expected every group to have at least one on-policy row"):
        _core.hybrid_batch_fields(scores, group_ids, is_expert, torch.zeros(3, 4), torch.ones(3, 4), ck.CalibRLConfig())


def test_mismatched_lengths_fail():
    cfg = ck.CalibRLConfig()
    with pytest.raises(ValueError, match=r"group_ids: expected shape \(B,\) like scores"):
        _core.hybrid_batch_fields(torch.zeros(3), torch.zeros(4, dtype=torch.long), torch.tensor([False, False, True]),
                                  torch.zeros(3, 5), torch.ones(3, 5), cfg)
    fields = _core.hybrid_batch_fields(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 0, 0]),
                                       torch.tensor([False, False, True]), torch.zeros(3, 5), torch.ones(3, 5), cfg)
    hidden, weight = torch.randn(3, 5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"mask: expected shape \(B, T\)"):
        _core.calibrl_batch_loss(hidden, weight, torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 4), None, fields, cfg)
    with pytest.raises(ValueError, match=r"targets: expected shape hidden.shape\[:-1\]"):
        _core.calibrl_batch_loss(hidden, weight, torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 5), None, fields, cfg)
