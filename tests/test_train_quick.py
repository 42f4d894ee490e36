"""End-to-end --quick runs of python -m calibrl.train: every algorithm, resume, Ctrl-C, --model, plots.

Rewards are scripted (tests/_train_helpers.py): the tiny model never answers right, so real rewards
would make every update zero.
"""

import os
import signal

import pytest
import torch

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from _tiny_models import TEXT_WIDTH, tiny_vl_config, tokenizer_text_config  # noqa: E402
from _train_helpers import all_finite, comparable, metrics, quick_run, rl_records, saved_config  # noqa: E402

from calibrl import checkpoint  # noqa: E402
from calibrl.config import ALGOS, ConfigError, parse_config  # noqa: E402
from calibrl.train import INTERRUPTED_EXIT_CODE, Trainer, main  # noqa: E402

LOSS_KEYS = ("pg_loss", "guide_loss", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl", "loss")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted quick calibrl run of 3 RL steps (shared by the resume, plot and --model tests)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert quick_run(out, "--max-steps", 3, tensorboard=True) == 0
    assert all(r["grad_norm"] > 0 and r["guide_loss"] != 0 for r in rl_records(out))  # real updates to resume
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
        assert record["group_pass_rate"] == [0.6667, 0.3333]  # scripted rewards
        assert record["expert_reward"] == pytest.approx(1.1)  # experts are correct and formatted
        assert record["grad_norm"] > 0  # mixed outcomes: non-zero advantages, a real update
        assert (record["guide_loss"] != 0) == (algo == "calibrl")
    assert sft[0]["grad_norm"] > 0
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


@pytest.mark.parametrize(
    "sig, exit_code", [(signal.SIGINT, INTERRUPTED_EXIT_CODE), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_signal_saves_mid_warm_start_and_resume_matches(tmp_path, reference_run, monkeypatch, sig, exit_code):
    out = tmp_path / "interrupted"
    previous_handler = signal.getsignal(sig)
    original = Trainer.sft_step

    def interrupted_sft_step(self):
        record = original(self)
        if self.step == 1:
            os.kill(os.getpid(), sig)  # what Ctrl-C / a scheduler's stop sends; the trainer's handler catches it
        return record

    monkeypatch.setattr(Trainer, "sft_step", interrupted_sft_step)
    assert quick_run(out, "--max-steps", 3) == exit_code  # 128 + the signal's number
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["ckpt-0000001.pt"]
    assert signal.getsignal(sig) is previous_handler  # handler restored
    monkeypatch.setattr(Trainer, "sft_step", original)
    assert quick_run(out, "--resume", out) == 0
    assert comparable(metrics(out)) == comparable(metrics(reference_run))


def _usage_error(capsys, *flags):
    """The argparse-style message of a refused run (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        quick_run(*flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: python -m calibrl.train")
    return error


def test_resume_refuses_changed_settings(tmp_path, reference_run, capsys):
    assert "['lr'] differ" in _usage_error(capsys, tmp_path, "--resume", reference_run, "--lr", "0.5")
    assert "--resume: no checkpoint" in _usage_error(capsys, tmp_path, "--resume", tmp_path)
    assert "already holds a run" in _usage_error(capsys, reference_run)


def test_config_errors_are_usage_errors(tmp_path, capsys, monkeypatch):
    assert "mix_ratio: expected a number in [0, 1], got 2.0" in _usage_error(capsys, tmp_path, "--mix-ratio", "2")
    assert "loss: " in _usage_error(capsys, tmp_path, "--clip-low", "-1")  # CalibRLConfig's own check
    # under torchrun (WORLD_SIZE) the batches must split evenly over processes: refused before start-up
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "prompts_per_step: expected a multiple of the number of processes (3)" in _usage_error(
        capsys, tmp_path, "--prompts-per-step", "4"
    )  # checked before sft_batch_size
    error = _usage_error(capsys, tmp_path, "--prompts-per-step", "6")
    assert "sft_batch_size: expected a multiple of the number of processes (3)" in error and error.endswith("got 4\n")
    assert not os.path.exists(tmp_path / "config.json")  # nothing started


def test_check_processes():
    cfg = parse_config(["--quick"])  # 2 prompts per step, 4 questions per SFT step, 2 mini-batches
    assert cfg.check_processes(2) is cfg  # one group per process: valid (mini-batches are over all groups)
    with pytest.raises(ConfigError, match="prompts_per_step: expected a multiple of the number of processes"):
        cfg.check_processes(4)
    cfg = parse_config(["--quick", "--prompts-per-step", "8", "--sft-batch-size", "6"])
    with pytest.raises(ConfigError, match="sft_batch_size: expected a multiple of the number of processes"):
        cfg.check_processes(4)


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
    with pytest.raises(ConfigError, match="max_stepz"):
        parse_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="mini_batches"):
        parse_config(["--prompts-per-step", "2", "--mini-batches", "3"])
    path.write_text('{"explicit": ["lr"]}')  # bookkeeping, not a setting
    with pytest.raises(ConfigError, match="explicit"):
        parse_config(["--config", str(path)])
    cfg = parse_config(["--lr", "0.1", "--quick"])
    assert cfg.explicit == ("lr", "quick") and "explicit" not in cfg.to_dict()


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
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=1,
        out_hidden_size=TEXT_WIDTH,  # the merger's output
        patch_size=8,
        temporal_patch_size=1,
        spatial_merge_size=2,
        window_size=32,
        fullatt_block_indexes=[1],
    )
    mrope = {"type": "mrope", "mrope_section": [4, 6, 6]}
    config = tiny_vl_config(
        Qwen2_5_VLConfig, tokenizer, vision, tie_word_embeddings=True, num_attention_heads=1, rope_scaling=mrope
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
    rl = rl_records(out)[0]
    assert rl["expert_rows_kept"] == 0 and all_finite(rl) and rl["grad_norm"] > 0
    out = tmp_path / "pass"
    assert quick_run(out, "--mixup-policy", "pass", "--pass-ratio-low", "0.5", "--max-steps", 1) == 0
    rl = rl_records(out)[0]
    assert rl["group_pass_rate"] == [0.6667, 0.3333]  # scripted rewards
    assert rl["expert_rows_kept"] == 0.5  # only the first group's pass rate lies in [0.5, 1]
    assert rl["grad_norm"] > 0


def test_model_path_loads_a_text_only_causal_lm(tmp_path, reference_run):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(reference_run / "tokenizer"))
    config = Qwen2Config(**tokenizer_text_config(tokenizer, tie_word_embeddings=True))
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    out = tmp_path / "text_only"
    assert quick_run(out, "--model", tmp_path / "lm", "--max-steps", 1) == 0
    assert all_finite([r for r in metrics(out) if r["phase"] == "rl" and r["step"] == 1][0])


def test_plot_overlays_runs(tmp_path, reference_run):
    from calibrl.plot import main as plot_main

    out = tmp_path / "cmp.png"
    assert (
        plot_main(
            [
                str(reference_run),
                str(reference_run),
                "--labels",
                "a,b",
                "--out",
                str(out),
                "--metrics",
                "accuracy,entropy,eval_accuracy,sft_loss",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_main([str(reference_run)]) == 0  # default: RUN_DIR/curves.png
    assert (reference_run / "curves.png").is_file()


def _scored_batch(tmp_path, *flags):
    """A Trainer (SGD, constant lr) and a scored 2-group batch with old log-probs, advantages and baseline."""
    from calibrl import algorithms, distributed
    from calibrl.rollout import collect_rollouts, old_logprobs

    cfg = parse_config(
        ["--quick", "--out", str(tmp_path), "--rollouts-per-prompt", "4", "--max-new-tokens", "6", *flags]
    )
    trainer = Trainer(cfg, distributed.DistInfo(0, 1, torch.device("cpu")))
    trainer.optimizer = torch.optim.SGD(trainer.policy.model.parameters(), lr=0.05)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda k: 1.0)
    torch.manual_seed(0)
    batch = collect_rollouts(trainer.policy, trainer.train_examples[:2], [0, 1], 4, 6, 1.0)
    batch.rewards = torch.tensor([1.1, 0.0, 0.1, 0.0, 1.1] * 2)  # mixed outcomes in both groups
    batch.old_logp = old_logprobs(trainer.forward, batch, 1.0, 0)  # (B, T)
    trainer._group_statistics(batch)
    batch.baseline, batch.baseline_mask = algorithms.expert_baseline(
        batch.old_logp, batch.response_mask, batch.group_ids, batch.is_expert, trainer.loss_cfg
    )
    return trainer, batch


def test_ppo_update_moves_logprobs_along_the_advantage(tmp_path):
    """One SGD step of the update raises sum_i A_i * logp(row i) (first-order guarantee of the PG term)."""
    from calibrl.rollout import old_logprobs

    trainer, batch = _scored_batch(tmp_path, "--algo", "dapo", "--mini-batches", "1")
    update = trainer.update(batch)
    assert update["grad_norm"] > 0 and update["clipfrac"] == 0  # first step: ratio 1, nothing clipped
    after = old_logprobs(trainer.forward, batch, 1.0, 0)
    on_policy = ~batch.is_expert
    change = ((after - batch.old_logp) * batch.response_mask).sum(1)  # (B,) summed over each row's tokens
    advantages = batch.advantages
    assert (advantages[on_policy] * change[on_policy]).sum() > 0
    assert change[on_policy & (advantages > 0)].mean() > change[on_policy & (advantages < 0)].mean()


def _gradient(trainer):
    grads = [p.grad.flatten() for p in trainer.policy.model.parameters() if p.grad is not None]
    return torch.cat(grads).clone()


def test_micro_batches_and_zero_weight_passes_leave_the_gradient_unchanged(tmp_path):
    """Micro-batch losses are weighted by their loss rows: with a per-row aggregation (grpo: seq-mean-token-mean)
    one pass over all rows, one pass per row, and extra zero-weight passes give the same gradient."""
    trainer, batch = _scored_batch(tmp_path, "--algo", "grpo")
    rows = torch.arange(len(batch))
    gradients = []
    for micro_batch_rows, passes in ((0, 1), (1, len(batch)), (4, 5)):  # (4, 5): 3 real passes + 2 zero-weight
        trainer.cfg.micro_batch_rows = micro_batch_rows
        trainer.policy.model.zero_grad(set_to_none=True)
        metrics = trainer.update._accumulate(batch, rows, passes, float((~batch.is_expert).sum()))
        assert len(metrics) == (1 if micro_batch_rows == 0 else -(-len(batch) // micro_batch_rows))  # real ones
        gradients.append(_gradient(trainer))
    assert gradients[0].abs().sum() > 0
    for gradient in gradients[1:]:
        torch.testing.assert_close(gradient, gradients[0], atol=1e-6, rtol=1e-5)


def test_mini_batches_split_the_groups_of_all_processes():
    """Groups are dealt round-robin by global position: each mini-batch gets P / mini_batches groups (+-1)."""
    from calibrl.update import micro_batches_needed, minibatch_of_groups

    assert minibatch_of_groups(1, 0, 2).tolist() == [0] and minibatch_of_groups(1, 1, 2).tolist() == [1]
    assert minibatch_of_groups(1, 7, 2).tolist() == [1]  # 8 processes, P = 8, 2 mini-batches of 4 groups
    counts = torch.zeros(3, dtype=torch.long)
    for rank in range(4):  # P = 20 over 4 processes, 3 mini-batches
        mine = minibatch_of_groups(5, rank, 3)
        assert mine.bincount(minlength=3).max() <= 2  # a process's groups are spread too
        counts += mine.bincount(minlength=3)
    assert sorted(counts.tolist()) == [6, 7, 7]
    assert (micro_batches_needed(0, 4), micro_batches_needed(5, 0), micro_batches_needed(9, 4)) == (0, 1, 3)


def test_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    out = tmp_path / "lr"
    assert quick_run(out, "--warmup-steps", "4", "--max-steps", 1, "--sft-lr", "0.001", "--lr", "0.0001") == 0
    records = metrics(out)
    sft = [r["lr"] for r in records if r["phase"] == "sft"]
    assert sft == pytest.approx([0.001 / 4, 0.001 * 2 / 4])  # warmup (k + 1) / 4 for optimizer steps k = 0, 1
    assert rl_records(out)[0]["lr"] == pytest.approx(0.0001 * 2 / 4)  # 2 mini-batches: the step's last update


def test_tensorboard_scalars_and_no_duplicates_after_resume(tmp_path, reference_run):
    """The reference run wrote TensorBoard events; a run resumed from step 2 rewrites step 3 only once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir):
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        return events, {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    events, steps = scalars(reference_run)
    expected = {
        "sft/sft_loss",
        "sft/lr",
        "rl/reward",
        "rl/accuracy",
        "rl/entropy",
        "rl/pg_loss",
        "rl/guide_loss",
        "rl/clipfrac",
        "rl/clipfrac_lower",
        "rl/ppo_kl",
        "rl/response_length",
        "rl/tokens_per_s",
        "rl/peak_memory_mb",
        "rl/grad_norm",
        "rl/eval_accuracy",
        "rl/eval_sampled_accuracy",
    }
    assert expected <= set(steps)
    assert steps["sft/sft_loss"] == [1, 2] and steps["rl/reward"] == [3, 4, 5]  # global step: SFT, then RL
    assert steps["rl/eval_accuracy"] == [2, 3, 4, 5]  # after the warm start, then every RL step
    assert "rl/group_pass_rate" in events.Tags()["histograms"]
    record = {(r["phase"], r["step"]): r for r in metrics(reference_run)}[("rl", 3)]
    assert events.Scalars("rl/guide_loss")[-1].value == pytest.approx(record["guide_loss"])

    out = tmp_path / "resumed"
    assert quick_run(out, "--max-steps", 3, tensorboard=True) == 0
    os.remove(checkpoint.latest_checkpoint(str(out)))  # its last checkpoint is RL step 3: resume from step 2
    assert quick_run(out, "--resume", out, "--max-steps", 3, tensorboard=True) == 0
    _, resumed = scalars(out)
    assert resumed["rl/reward"] == [3, 4, 5] and resumed["rl/eval_accuracy"] == [2, 3, 4, 5]


def test_bf16_autocast_run(tmp_path, monkeypatch):
    """--dtype bf16: every forward pass under bf16 autocast (CPU here), fp32 weights and optimizer state, and
    the fused lm_head ops (old log-probs, warm start, loss) get bf16 hidden states and a bf16 head: the bf16
    kernels (tensor cores on a GPU), not fp32 inputs on the FMA path."""
    import calibrl_kernels as ck

    seen = []
    for name in ("fused_linear_calibrl_loss", "linear_token_logprobs"):

        def spy(hidden, weight, *args, _op=getattr(ck, name), _name=name, **kwargs):
            seen.append((_name, hidden.dtype, weight.dtype))
            return _op(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(ck, name, spy)
    out = tmp_path / "bf16"
    assert quick_run(out, "--dtype", "bf16", "--max-steps", 1) == 0
    assert {name for name, _, _ in seen} == {"fused_linear_calibrl_loss", "linear_token_logprobs"}
    assert {(h, w) for _, h, w in seen} == {(torch.bfloat16, torch.bfloat16)}, set(seen)
    record = rl_records(out)[0]
    assert all_finite(record) and record["grad_norm"] > 0
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(out)))
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}


def test_peak_memory_is_measured_per_step():
    """peak_memory_mb covers the time since reset_peak_memory, not the whole process (Linux VmHWM)."""
    from calibrl.run_log import peak_memory_mb, reset_peak_memory

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched; large enough to be returned to the system on free
    with_block = peak_memory_mb(cpu)
    del block
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < with_block - 40


def test_reward_function_that_raises_scores_zero_and_the_run_goes_on(tmp_path, capsys):
    import _flaky_reward

    _flaky_reward.CALLS[0] = 0
    out = tmp_path / "flaky"
    # authors' format: truncated responses (every response of the tiny model) also reach the verifier
    assert (
        main(
            [
                "--quick",
                "--out",
                str(out),
                "--no-tensorboard",
                "--reward-fn",
                "_flaky_reward:score",
                "--reward-format",
                "authors",
                "--max-steps",
                "2",
            ]
        )
        == 0
    )
    records = rl_records(out)
    calls = _flaky_reward.CALLS[0]
    assert calls > 20  # rollouts and evaluations went through it
    assert sum(r["reward_errors"] for r in records) == _flaky_reward.expected_errors(calls) > 0
    assert all(all_finite(r) for r in records)
    printed = capsys.readouterr().out
    assert "reward function raised on" in printed and "ValueError: verifier bug on call 3" in printed


@pytest.mark.parametrize(
    "spec, error",
    [
        ("no_colon", "package.module:function"),
        ("not_a_module_xyz:score", "cannot load"),
        ("calibrl.rewards:FORMAT_WEIGHT", "not a function"),
    ],
)
def test_bad_reward_fn_is_refused_by_name(tmp_path, spec, error, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path / "bad"), "--reward-fn", spec])
    assert exit_info.value.code == 2
    assert "reward_fn" in (message := capsys.readouterr().err) and error in message


def test_init_from_and_model_are_refused_together():
    with pytest.raises(ConfigError, match="init_from: cannot be combined with model"):
        parse_config(["--init-from", "runs/warm", "--model", "some/folder"])


def test_compile_flag_trains_as_eager_does(tmp_path, reference_run):
    """--compile runs the policy loss under torch.compile(fullgraph=True): the same losses and gradient norms
    as the eager run of the same settings (the rollouts are identical until the first update differs)."""
    out = tmp_path / "compiled"
    assert quick_run(out, "--max-steps", 3, "--compile") == 0
    eager, compiled = rl_records(reference_run), rl_records(out)
    assert len(compiled) == len(eager) > 0 and saved_config(out)["compile"] is True
    for want, got in zip(eager, compiled):
        for key in LOSS_KEYS + ("grad_norm",):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
