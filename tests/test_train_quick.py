"""End-to-end --quick runs of python -m calibrl.train: every algorithm, resume, Ctrl-C, --model, plots."""

import os
import signal

import pytest
import torch

from calibrl import checkpoint
from calibrl.config import ALGOS, parse_config
from calibrl.train import INTERRUPTED_EXIT_CODE, Trainer

from _train_helpers import all_finite, comparable, metrics, quick_run, saved_config

LOSS_KEYS = ("pg_loss", "guide_loss", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl", "loss")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted quick calibrl run of 3 RL steps (shared by the resume, plot and --model tests)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert quick_run(out, "--max-steps", 3) == 0
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_quick_run_writes_metrics_and_checkpoint(tmp_path, algo):
    out = tmp_path / "run"
    assert quick_run(out, "--algo", algo) == 0
    records = metrics(out)
    sft = [r for r in records if r["phase"] == "sft"]
    rl = [r for r in records if r["phase"] == "rl" and r["step"] > 0]
    assert len(sft) == (4 if algo == "sft+grpo" else 2)  # sft+grpo: longer supervised stage
    assert [r["step"] for r in rl] == [1, 2]
    for record in rl:
        assert all(key in record for key in LOSS_KEYS + ("reward", "accuracy", "eval_accuracy", "group_pass_rate"))
        assert all_finite(record)
        assert len(record["group_pass_rate"]) == 2
        assert record["expert_reward"] == pytest.approx(1.1)  # experts are correct and formatted
    if algo != "calibrl":
        assert all(r["guide_loss"] == 0 for r in rl)
    assert checkpoint.latest_checkpoint(str(out)).endswith(f"ckpt-{len(sft) + 2:07d}.pt")
    assert os.path.isfile(out / "final_model" / "config.json")
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(out)))
    assert {"model", "optimizer", "scheduler", "rng", "sampler", "phase", "step", "config"} <= set(state)
    assert state["config"]["algo"] == algo and saved_config(out)["algo"] == algo


def test_resume_reproduces_the_next_steps_exactly(tmp_path, reference_run):
    out = tmp_path / "resumed"
    assert quick_run(out, "--max-steps", 2) == 0
    assert quick_run(out, "--resume", out, "--max-steps", 3) == 0
    expected, got = comparable(metrics(reference_run)), comparable(metrics(out))
    assert got.keys() == expected.keys()
    assert got[("rl", 3)] == expected[("rl", 3)]  # bit-identical on CPU
    assert got == expected


def test_ctrl_c_saves_mid_warm_start_and_resume_matches(tmp_path, reference_run, monkeypatch):
    out = tmp_path / "interrupted"
    original = Trainer.sft_step

    def interrupted_sft_step(self):
        record = original(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the trainer's handler catches it
        return record

    monkeypatch.setattr(Trainer, "sft_step", interrupted_sft_step)
    assert quick_run(out, "--max-steps", 3) == INTERRUPTED_EXIT_CODE
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["ckpt-0000001.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(Trainer, "sft_step", original)
    assert quick_run(out, "--resume", out) == 0
    assert comparable(metrics(out)) == comparable(metrics(reference_run))


def test_resume_refuses_changed_settings(tmp_path, reference_run):
    with pytest.raises(ValueError, match=r"\['lr'\] differ"):
        quick_run(tmp_path, "--resume", reference_run, "--lr", "0.5")
    with pytest.raises(ValueError, match="no checkpoint"):
        quick_run(tmp_path, "--resume", tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        quick_run(reference_run)


def test_keep_last_checkpoints(reference_run):
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(reference_run))]
    assert names == ["ckpt-0000004.pt", "ckpt-0000005.pt"]  # 2 SFT + 3 RL steps, keep 2
    assert not [n for n in os.listdir(checkpoint.checkpoint_dir(str(reference_run))) if ".tmp" in n]


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: grpo\nmax_steps: 7\nloss:\n  clip_high: 0.28\nguide_coef: 0.3\n")
    cfg = parse_config(["--config", str(path), "--max-steps", "5", "--no-norm-by-std"])
    assert (cfg.algo, cfg.max_steps) == ("grpo", 5)  # the flag wins over the file
    loss = cfg.loss_config()
    assert (loss.mode, loss.clip_high, loss.guide_coef, loss.norm_by_std) == ("grpo", 0.28, 0.3, False)
    assert loss.loss_agg_mode == "seq-mean-token-mean"  # untouched fields keep the preset
    path.write_text('{"max_stepz": 3}')
    with pytest.raises(ValueError, match="max_stepz"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="mini_batches"):
        parse_config(["--prompts-per-step", "2", "--mini-batches", "3"])


def test_model_path_loads_a_saved_multimodal_checkpoint(tmp_path, reference_run):
    """--model PATH: the reference run's final model (Qwen2-VL format + its tokenizer and processor)."""
    out = tmp_path / "from_checkpoint"
    assert quick_run(out, "--model", reference_run / "final_model", "--max-steps", 1) == 0
    rl = [r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0]
    assert all_finite(rl) and not os.path.isdir(out / "tokenizer")


def test_model_path_loads_a_qwen2_5_vl_checkpoint(tmp_path, reference_run):
    """A tiny Qwen2.5-VL (window-attention vision tower) with the run's tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    source = reference_run / "final_model"
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=32, patch_size=8,
                           temporal_patch_size=1, spatial_merge_size=2, window_size=32, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path / "vl25")
    tokenizer.save_pretrained(tmp_path / "vl25")
    AutoImageProcessor.from_pretrained(str(source)).save_pretrained(tmp_path / "vl25")
    out = tmp_path / "qwen25"
    assert quick_run(out, "--model", tmp_path / "vl25", "--max-steps", 1) == 0
    assert all_finite([r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0])


def test_expert_mixing_options(tmp_path):
    out = tmp_path / "mix"
    assert quick_run(out, "--algo", "luffy", "--mix-ratio", "0", "--max-steps", 1) == 0
    rl = [r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0]
    assert rl["expert_rows_kept"] == 0 and all_finite(rl)
    out = tmp_path / "pass"
    assert quick_run(out, "--mixup-policy", "pass", "--pass-ratio-low", "0.5", "--max-steps", 1) == 0
    rl = [r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0]
    expected = sum(0.5 <= p <= 1.0 for p in rl["group_pass_rate"]) / len(rl["group_pass_rate"])
    assert rl["expert_rows_kept"] == expected


def test_model_path_loads_a_text_only_causal_lm(tmp_path, reference_run):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(reference_run / "tokenizer"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    out = tmp_path / "text_only"
    assert quick_run(out, "--model", tmp_path / "lm", "--max-steps", 1) == 0
    assert all_finite([r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0])


def test_plot_overlays_runs(tmp_path, reference_run):
    from calibrl.plot import main as plot_main

    out = tmp_path / "cmp.png"
    assert plot_main([str(reference_run), str(reference_run), "--labels", "a,b", "--out", str(out),
                      "--metrics", "accuracy,entropy,eval_accuracy,sft_loss"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_main([str(reference_run)]) == 0  # default: RUN_DIR/curves.png
    assert (reference_run / "curves.png").is_file()


def test_ppo_update_moves_logprobs_along_the_advantage(tmp_path):
    """One SGD step of the update raises sum_i A_i * logp(row i) (first-order guarantee of the PG term)."""
    from calibrl import algorithms, distributed
    from calibrl.rollout import collect_rollouts, old_logprobs

    cfg = parse_config(["--quick", "--out", str(tmp_path), "--algo", "dapo", "--mini-batches", "1",
                        "--rollouts-per-prompt", "4", "--max-new-tokens", "6"])
    trainer = Trainer(cfg, distributed.DistInfo(0, 1, torch.device("cpu")))
    trainer.optimizer = torch.optim.SGD(trainer.policy.model.parameters(), lr=0.05)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda k: 1.0)
    torch.manual_seed(0)
    examples = trainer.train_examples[:2]
    batch = collect_rollouts(trainer.policy, examples, [0, 1], 4, 6, 1.0)
    batch.rewards = torch.tensor([1.1, 0.0, 0.1, 0.0, 1.1] * 2)  # mixed outcomes in both groups
    batch.old_logp = old_logprobs(trainer.forward, batch, 1.0, 0, torch.no_grad)  # (B, T)
    stats, _ = trainer._group_statistics(batch)
    baseline, baseline_mask = algorithms.expert_baseline(batch.old_logp, batch.response_mask, batch.group_ids,
                                                         batch.is_expert, trainer.loss_cfg)
    update = trainer._ppo_update(batch, stats["advantages"], stats["passed"], baseline, baseline_mask)
    assert update["grad_norm"] > 0 and update["clipfrac"] == 0  # first step: ratio 1, nothing clipped
    after = old_logprobs(trainer.forward, batch, 1.0, 0, torch.no_grad)
    on_policy = ~batch.is_expert
    change = ((after - batch.old_logp) * batch.response_mask).sum(1)  # (B,) summed over each row's tokens
    assert (stats["advantages"][on_policy] * change[on_policy]).sum() > 0
    assert change[on_policy & (stats["advantages"] > 0)].mean() > change[on_policy & (stats["advantages"] < 0)].mean()
