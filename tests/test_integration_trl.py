"""CalibRLTrainer (TRL 1.16 GRPOTrainer subclass): real training steps on CPU, parity with calibrl_kernels,
per-row fields through TRL's shuffling/splitting, and clear errors on bad input.

Tiny models are built from configs and the tokenizer in memory (tests/_tiny_models.py): nothing is
downloaded. Each trainer run is 2 steps of a few rows with completions of at most 6 tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'calibrl[trl]')")

from datasets import Dataset  # noqa: E402

import calibrl_kernels as ck  # noqa: E402
from calibrl import algorithms  # noqa: E402
from calibrl.integrations import _core  # noqa: E402
from calibrl.integrations.trl import CalibRLGRPOConfig, CalibRLTrainer, expert_text  # noqa: E402
from calibrl_kernels.config import LossInputs  # noqa: E402

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


def run_settings(tmp_path, **overrides) -> dict:
    """The training arguments of every test run (CPU, fp32, 2 steps, no reports or checkpoints), with ``overrides``."""
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
    )
    return {**settings, **overrides}


def make_args(tmp_path, **overrides):
    return CalibRLGRPOConfig(**run_settings(tmp_path, **overrides))


def make_text_trainer(tmp_path, dataset=None, **overrides):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(len(tokenizer))
    return CalibRLTrainer(
        model=model,
        reward_funcs=text_reward,
        args=make_args(tmp_path, **overrides),
        train_dataset=text_dataset() if dataset is None else dataset,
        processing_class=tokenizer,
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
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "What colour?"}]] * 4,
            "image": [Image.new("RGB", (56, 56), c) for c in colours],
            "expert": [[{"role": "assistant", "content": c}] for c in colours],
            "answer": colours,
        }
    )
    trainer = CalibRLTrainer(
        model=model,
        reward_funcs=text_reward,
        args=make_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2),
        train_dataset=dataset,
        processing_class=processor,
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
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -T - 1 : -1]
        with torch.no_grad():
            old = ck.linear_token_logprobs(
                hidden, model.lm_head.weight, batch["completion_ids"], temperature=config.temperature
            )
        return hidden, old

    assert config.loss_agg_mode == "token-mean" and not config.norm_by_std and config.dual_clip_c == 3.0
    scores, group_ids = batch[_core.FIELD_SCORES], batch[_core.FIELD_GROUP_IDS]
    is_expert, mask = batch[_core.FIELD_IS_EXPERT], batch["completion_mask"]

    def slim_trainer_path():
        hidden, old = hidden_and_old()
        stats = algorithms.group_statistics(scores, group_ids, is_expert, config)
        baseline, baseline_mask = algorithms.expert_baseline(old, mask, group_ids, is_expert, config)
        return algorithms.policy_loss(
            hidden,
            model.lm_head.weight,
            None,
            batch["completion_ids"],
            LossInputs(old, stats.advantages, mask, baseline, stats.passed, is_expert, baseline_mask),
            config,
        ).loss

    def direct_path():
        hidden, old = hidden_and_old()
        return ck.fused_linear_calibrl_loss(
            hidden,
            model.lm_head.weight,
            batch["completion_ids"],
            old,
            None,
            mask,
            scores=scores,
            group_ids=group_ids,
            is_expert=is_expert,
            config=config,
        ).loss

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
        "calibrl",
        "bnpo",
        "none",
        3.0,
        "expert",
    )
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
    with pytest.raises(
        ValueError,
        match=r"calibrl_algo: 'dapo' is a TRL loss type here; use calibrl_algo='grpo', "
        "loss_type='dapo'",
    ):
        make_args(tmp_path, calibrl_algo="dapo")
    with pytest.raises(ValueError, match=r"delta: expected None, inf or a number >= 1 \+ epsilon_high = 1.28"):
        make_args(tmp_path, delta=1.1, epsilon_high=0.28)
    with pytest.raises(ValueError, match=r"loss_type: CalibRLTrainer computes TRL's loss types .* got 'cispo'"):
        make_args(tmp_path, loss_type="cispo")


def test_every_calibrl_field_has_help_text():
    import dataclasses as dc

    own = [
        f
        for f in dc.fields(CalibRLGRPOConfig)
        if f.name.startswith(("calibrl", "expert")) or f.name in ("loss_type", "scale_rewards", "delta")
    ]
    assert len(own) >= 14
    for f in own:
        assert len(f.metadata.get("help", "")) > 30, f.name


def test_flat_fields_are_generated_from_calibrl_config(tmp_path):
    import dataclasses as dc

    from calibrl.integrations import trl as ctrl

    kernel = {f.name: f for f in dc.fields(ck.CalibRLConfig)}
    flat = {f.name[len("calibrl_") :]: f for f in dc.fields(CalibRLGRPOConfig) if f.name.startswith("calibrl_")}
    flat.pop("algo")
    # Every CalibRLConfig field is either decided by TRL's own fields or a generated calibrl_<name> flag.
    assert set(flat) == set(kernel) - set(ctrl._TRL_OWNED)
    assert set(make_args(tmp_path)._trl_owned_fields()) | {"mode"} == set(ctrl._TRL_OWNED)
    for name, f in flat.items():
        assert f.default is None and f.type == f"Optional[{kernel[name].type}]", name
        assert f.metadata["help"].startswith(kernel[name].metadata["help"]), name
    args = make_args(tmp_path, calibrl_huber_delta=2.0, calibrl_activation="huber")
    assert (args.calibrl_config.huber_delta, args.calibrl_config.activation) == (2.0, "huber")


def test_expert_text_forms():
    assert expert_text("a", "expert", 0) == "a"
    assert expert_text({"role": "assistant", "content": "b"}, "expert", 0) == "b"
    assert expert_text([{"role": "assistant", "content": [{"type": "text", "text": "c"}]}], "expert", 0) == "c"
    with pytest.raises(TypeError, match=r"expert \(row 3\): expected a string"):
        expert_text(5, "expert", 3)
    with pytest.raises(ValueError, match=r"expert \(row 1\): expected a non-empty expert completion"):
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
    with pytest.raises(
        ValueError, match=r"expert \(row \d+\): the expert completion has \d+ tokens, more than max_completion_length=6"
    ):
        trainer.train()


def test_mode_needing_experts_without_column_fails(tmp_path):
    with pytest.raises(ValueError, match="expert_column: the train_dataset has no column 'expert'"):
        make_text_trainer(tmp_path, dataset=text_dataset(expert=False), calibrl_algo="luffy")


def test_groups_split_by_steps_per_generation_fail(tmp_path):
    # 4 rows x 3 steps = 12 rows = 6 groups of 2 -> 18 rows with experts: divisible by 3, fine; 4 x 2 with n=4:
    # 2 groups -> 10 rows, not divisible by steps_per_generation=4
    with pytest.raises(ValueError, match="steps_per_generation: the 2 prompt groups of 4 rows"):
        make_text_trainer(
            tmp_path,
            per_device_train_batch_size=2,
            num_generations=4,
            steps_per_generation=4,
            gradient_accumulation_steps=4,
        )


def test_unsupported_trl_options_fail(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"beta: CalibRLTrainer supports only beta=0.0, got 0.1 \(CalibRLTrainer "
        r"loads no reference model and has no KL penalty\)",
    ):
        make_text_trainer(tmp_path, beta=0.1)
    with pytest.raises(
        ValueError,
        match="entropy_coef: CalibRLTrainer supports only entropy_coef=0.0, got 0.01 "
        r"\(TRL's entropy bonus; calibrl_entropy_coef is CalibRL's",
    ):
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
        _core.hybrid_batch_fields(
            torch.zeros(3),
            torch.zeros(4, dtype=torch.long),
            torch.tensor([False, False, True]),
            torch.zeros(3, 5),
            torch.ones(3, 5),
            cfg,
        )
    fields = _core.hybrid_batch_fields(
        torch.tensor([0.0, 1.0, 1.0]),
        torch.tensor([0, 0, 0]),
        torch.tensor([False, False, True]),
        torch.zeros(3, 5),
        torch.ones(3, 5),
        cfg,
    )
    hidden, weight = torch.randn(3, 5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"mask: expected shape \(B, T\)"):
        _core.calibrl_batch_loss(
            hidden, weight, torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 4), None, fields, cfg
        )
    with pytest.raises(ValueError, match=r"targets: expected shape hidden.shape\[:-1\]"):
        _core.calibrl_batch_loss(
            hidden, weight, torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 5), None, fields, cfg
        )


# ---------------------------------------------------------------------------------------------- TRL's own loss
# Completions fixed per (prompt, index within its group), so that TRL's GRPOTrainer and CalibRLTrainer score
# the same rows: unequal lengths, one truncated completion (no EOS: an empty row under
# mask_truncated_completions) and one completion whose reward is None (TRL: advantage 0, row kept).
SCRIPTED = {
    "1+1=": ["2", "2 2", "abcdefgh", "7"],
    "2+2=": ["4", "x", "4 4 4", "9 9"],
    "3+1=": ["4 o", "5", "44", "x"],
    "2+1=": ["3", "3 3 3", "1", "33"],
}


def scripted_rollout(prompts, trainer):
    tokenizer = trainer.processing_class
    n, eos = trainer.num_generations, tokenizer.eos_token_id
    limit = trainer.max_completion_length
    completions = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(SCRIPTED[prompt][i % n], add_special_tokens=False)["input_ids"] + [eos]
        completions.append(ids[:limit])  # "abcdefgh" loses its EOS: truncated
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}


def scripted_reward(completions, answer, **kwargs):
    return [None if c == "x" else float(c.startswith(a)) + 0.1 * len(c) for c, a in zip(completions, answer)]


def scripted_trainer(cls, args, tokenizer, dataset):
    """A trainer of class ``cls`` on the scripted completions and rewards, with a fresh tiny model (seed 0)."""
    return cls(
        model=tiny_causal_lm(len(tokenizer)),
        reward_funcs=scripted_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=scripted_rollout,
    )


def trl_trainer_pair(tmp_path, algo, loss_type, monkeypatch):
    """CalibRLTrainer and TRL's GRPOTrainer with equal settings and equal tiny models (seed 0)."""
    from trl import GRPOConfig, GRPOTrainer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    common = run_settings(
        tmp_path,
        per_device_train_batch_size=8,
        num_generations=4,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
        num_iterations=2,  # TRL then computes old log-probs at generation (used by the off-policy half)
        mask_truncated_completions=True,
        loss_type=loss_type,
        scale_rewards="group",
        epsilon=0.2,
        epsilon_high=0.28,
    )
    delta = 3.0 if algo == "calibrl" else None  # CalibRL's default dual clip in calibrl mode, TRL's (off) in grpo
    tokenizer = char_tokenizer()
    # No scripted completion starts like its expert: a shared prefix gives z = 0 exactly at the guide's kink,
    # where the gradient's slope (1 or alpha) would be decided by rounding.
    dataset = text_dataset(expert=["ok " + a for a in ("2", "4", "4", "3")], n=4)
    trainers = []
    for cls, args in (
        (CalibRLTrainer, CalibRLGRPOConfig(calibrl_algo=algo, **common)),
        (GRPOTrainer, GRPOConfig(delta=delta, **common)),
    ):
        trainer = scripted_trainer(cls, args, tokenizer, dataset)
        trainer.current_gradient_accumulation_steps = 2
        trainer.model.train()
        trainers.append(trainer)
    assert trainers[0].args.delta == delta
    return trainers


def trl_view(micro_batch):
    """The on-policy rows of a CalibRLTrainer micro-batch, with the fields GRPOTrainer._compute_loss reads."""
    rows = ~micro_batch[_core.FIELD_IS_EXPERT]
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "old_per_token_logps")
    view = {key: micro_batch[key][rows] for key in keys if key in micro_batch}
    view["num_items_in_batch"] = micro_batch["num_items_in_batch"]
    return view


def independent_guide_term(trl_trainer, micro_batch, loss_type):
    """beta * the guide term of CalibRL.md, from TRL's own log-probs and TRL's normaliser of loss_type."""
    config = ck.CalibRLConfig()  # guide settings at their defaults in the test's calibrl trainer
    view = trl_view(micro_batch)
    rows = ~micro_batch[_core.FIELD_IS_EXPERT]
    input_ids = torch.cat([view["prompt_ids"], view["completion_ids"]], 1)
    attention_mask = torch.cat([view["prompt_mask"], view["completion_mask"]], 1)
    T = view["completion_ids"].size(1)
    lp, _, _ = trl_trainer._get_per_token_logps_and_entropies(trl_trainer.model, input_ids, attention_mask, T)
    sign = micro_batch[_core.FIELD_PASSED][rows].float().mul(2).sub(1)[:, None]  # +1 passed, -1 failed
    z = -sign * (lp - micro_batch[_core.FIELD_EXPERT_LOGP][rows])
    per_token = view["advantages"].abs()[:, None] * torch.nn.functional.leaky_relu(z, config.negative_slope)
    m = view["completion_mask"].float()
    rows_count, accumulation = m.size(0), 2
    if loss_type == "grpo":
        value = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / rows_count / accumulation
    elif loss_type == "bnpo":
        value = (per_token * m).sum() / m.sum().clamp(min=1) / accumulation
    elif loss_type == "dr_grpo":
        value = (per_token * m).sum() / (rows_count * trl_trainer.max_completion_length) / accumulation
    else:  # dapo: one process, accumulation == steps_per_generation
        value = (per_token * m).sum() / view["num_items_in_batch"]
    return config.guide_coef * value


@pytest.mark.parametrize("algo", ["grpo", "calibrl"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_loss_and_gradients_equal_trl_grpo_trainer(tmp_path, monkeypatch, algo, loss_type):
    """CalibRLTrainer.compute_loss vs TRL's GRPOTrainer.compute_loss on the same scripted generation batch, split
    into 2 accumulation steps of unequal token counts: first on-policy, then off-policy (old log-probs from
    generation, weights moved since). grpo mode: equal to fp32 rounding. calibrl mode: TRL's loss with delta=3
    on the on-policy rows plus the guide term computed independently from TRL's log-probs."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    ours, theirs = trl_trainer_pair(tmp_path, algo, loss_type, monkeypatch)
    inputs = [dict(ours.train_dataset[i]) for i in range(4) for _ in range(4)]  # 4 prompts x 4 generations
    batch = ours._generate_and_score_completions([dict(x) for x in inputs])
    trl_batch = theirs._generate_and_score_completions([dict(x) for x in inputs])
    on_policy = ~batch[_core.FIELD_IS_EXPERT]
    assert int((~on_policy).sum()) == (4 if algo == "calibrl" else 0)
    # TRL's own generation step gives the same rows, advantages and token count
    for key in ("advantages", "completion_mask", "old_per_token_logps"):
        got, want = batch[key][on_policy], trl_batch[key]
        torch.testing.assert_close(got[:, : want.size(1)] if got.dim() == 2 else got, want)
    assert int(batch["num_items_in_batch"]) == int(trl_batch["num_items_in_batch"])
    assert (batch["completion_mask"][on_policy].sum(-1) == 0).sum() == 1  # the truncated row is empty
    assert (trl_batch["advantages"] == 0).sum() >= 2  # the two rows whose reward is None
    torch.manual_seed(3)
    micro_batches = split_tensor_dict(shuffle_sequence_dict(batch), 2)
    tokens = [int(mb["completion_mask"][~mb[_core.FIELD_IS_EXPERT]].sum()) for mb in micro_batches]
    assert tokens[0] != tokens[1]

    def accumulate(off_policy):
        results = []
        for trainer in (ours, theirs):
            trainer.model.zero_grad()
        for mb in micro_batches:
            if not off_policy:
                mb = {k: v for k, v in mb.items() if k != "old_per_token_logps"}
            loss_ours = ours.compute_loss(ours.model, mb)
            loss_theirs = theirs.compute_loss(theirs.model, trl_view(mb))
            if algo == "calibrl":
                loss_theirs = loss_theirs + independent_guide_term(theirs, mb, loss_type)
            loss_ours.backward()
            loss_theirs.backward()
            results.append((loss_ours.detach(), loss_theirs.detach()))
        for loss_ours, loss_theirs in results:
            torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-8)
        grads_ours = dict(ours.model.named_parameters())
        for name, p_theirs in theirs.model.named_parameters():
            g_ours, g_theirs = grads_ours[name].grad, p_theirs.grad
            assert float((g_ours - g_theirs).norm()) <= 1e-5 * float(g_theirs.norm()) + 1e-9, name
        return results

    on = accumulate(off_policy=False)
    assert any(float(loss_ours) != 0.0 for loss_ours, _ in on)
    # Move both models' lm_head the same way: the old log-probs of generation are now off-policy.
    g = torch.Generator().manual_seed(0)
    noise = 0.3 * torch.randn(ours.model.lm_head.weight.shape, generator=g)
    with torch.no_grad():
        ours.model.lm_head.weight.add_(noise)
        theirs.model.lm_head.weight.add_(noise)
    accumulate(off_policy=True)
    # the off-policy half reaches the clip range and, for negative advantages, ratios above the dual clip's 3
    view = trl_view(batch)
    T = view["completion_ids"].size(1)
    lp, _, _ = theirs._get_per_token_logps_and_entropies(
        theirs.model,
        torch.cat([view["prompt_ids"], view["completion_ids"]], 1),
        torch.cat([view["prompt_mask"], view["completion_mask"]], 1),
        T,
    )
    log_ratio = (lp - view["old_per_token_logps"])[view["completion_mask"].bool()]
    negative = (view["advantages"][:, None] < 0).expand_as(lp)[view["completion_mask"].bool()]
    log_ratio = log_ratio.detach()
    assert float(log_ratio.abs().max()) < 20.0  # below the kernels' log-ratio clamp (TRL has none)
    assert bool((log_ratio[negative] > math.log(3.0)).any()) and bool((log_ratio.abs() > math.log(1.28)).any())


# ---------------------------------------------------------------------------------------------- processes
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_two_processes_equal_one_process(tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo) with 8 rows per process == one process with 16 rows.

    TRL gathers rewards across processes and normalises dapo by the generation batch's token count over every
    process, and DDP averages gradients, so 2 SGD steps give the same weights, loss and loss terms; the token
    means (entropy) and the reward / pass-rate metrics are reduced over both processes.
    """
    worker = os.path.join(os.path.dirname(__file__), "_trl_accelerate_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        worker,
        str(two),
        "8",
    ]
    result = subprocess.run(launch, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sys.path.insert(0, os.path.dirname(__file__))
    from _trl_accelerate_worker import main as run_worker

    run_worker(str(one), 16)
    logs = {}
    for name, out in (("two", two), ("one", one)):
        record = json.loads((out / "log_history.json").read_text())
        assert record["num_processes"] == (2 if name == "two" else 1)
        logs[name] = [entry for entry in record["log"] if "pg_loss" in entry]
    assert len(logs["two"]) == len(logs["one"]) == 2
    for entry_two, entry_one in zip(logs["two"], logs["one"]):
        for key in ("loss", "pg_loss", "guide_loss", "entropy", "reward", "calibrl/pass_rate", "calibrl/expert_reward"):
            assert entry_two[key] == pytest.approx(entry_one[key], rel=1e-5, abs=1e-7), key
    assert logs["one"][1]["guide_loss"] != 0 and logs["one"][0]["loss"] != logs["one"][1]["loss"]
    params_two, params_one = torch.load(two / "params.pt"), torch.load(one / "params.pt")
    initial = tiny_causal_lm(len(char_tokenizer())).state_dict()
    for name, value in params_one.items():
        torch.testing.assert_close(params_two[name], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(params_one[name], initial[name]) for name in initial)
