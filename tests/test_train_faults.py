"""Faults of a training run, end to end on --quick runs: a poisoned (non-finite) step, bad data rows, a torn
metrics line, a full disk while checkpointing, a newest checkpoint of another format, a second trainer on
the same run folder. Each run must keep its last good state, say what happened and be resumable.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from _train_helpers import quick_run, rl_records  # noqa: E402

from calibrl import checkpoint  # noqa: E402
from calibrl.run_log import TornLineWarning, metrics_path, read_metrics  # noqa: E402
from calibrl.step_guard import nonfinite_tensors  # noqa: E402
from calibrl.train import BAD_STEPS_EXIT_CODE, FAILED_EXIT_CODE, main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--quick", "--no-tensorboard"]


def _checkpoints(out):
    return {os.path.basename(p): checkpoint.load_checkpoint(p) for p in checkpoint.list_checkpoints(str(out))}


# ------------------------------------------------------------------------------------- non-finite steps
def test_poisoned_steps_are_skipped_never_checkpointed_and_the_run_resumes(tmp_path, capsys):
    import _overflow_reward

    out = tmp_path / "poisoned"
    _overflow_reward.POISON[0] = True
    try:
        # the authors' format: the quick model's responses are all truncated, which the strict format scores 0
        # without calling the verifier
        code = main(
            [
                *FLAGS,
                "--out",
                str(out),
                "--reward-fn",
                "_overflow_reward:score",
                "--reward-format",
                "authors",
                "--max-steps",
                "4",
                "--max-bad-steps",
                "2",
                "--keep-checkpoints",
                "0",
            ]
        )
    finally:
        _overflow_reward.POISON[0] = False
    assert code == BAD_STEPS_EXIT_CODE
    assert "stopping: 2 steps in a row (max_bad_steps=2) had a non-finite loss" in capsys.readouterr().err
    records = rl_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["skipped_updates"] for r in records] == [2, 2]  # both mini-batches of each step skipped
    assert all(r["skipped_updates"] == 0 for r in read_metrics(str(out)) if r["phase"] == "sft")
    states = _checkpoints(out)  # sft 1, 2 and rl 1, 2 (indices 3, 4): keep-checkpoints 0 keeps all
    assert list(states) == [f"ckpt-000000{i}.pt" for i in (1, 2, 3, 4)]
    for state in states.values():
        assert nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]}) == []
    warm, last = states["ckpt-0000002.pt"], states["ckpt-0000004.pt"]
    # the skipped steps changed neither the weights nor the optimizer state (the RL optimizer never stepped)
    assert all(torch.equal(warm["model"][k], last["model"][k]) for k in warm["model"])
    assert last["optimizer"]["state"] == {} and last["scheduler"]["last_epoch"] == 0
    # the same run with a verifier that works again continues from the last good state and finishes
    assert main([*FLAGS, "--out", str(out), "--resume", str(out), "--max-steps", "4"]) == 0
    records = rl_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped_updates"] for r in records[2:]] == [0, 0]
    path, state = checkpoint.load_latest(str(out))
    assert (state["phase"], state["step"]) == ("rl", 4) and not nonfinite_tensors(state["model"])


def _guard_worker(rank, init_file, results):
    """One of 2 gloo processes: rank 1 alone has a non-finite loss, then both are finite."""
    import torch.distributed as torch_dist

    from calibrl.distributed import DistInfo
    from calibrl.step_guard import NonFiniteGuard

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    guard = NonFiniteGuard(2, DistInfo(rank, 2, torch.device("cpu")))
    verdicts = [
        guard.step_is_finite(rank == 0, 1.0),
        guard.step_is_finite(True, 1.0),
        guard.step_is_finite(True, float("nan") if rank == 0 else 1.0),
    ]
    results[rank] = (verdicts, guard.end_step(), guard.bad_in_row)
    torch_dist.destroy_process_group()


def test_every_process_skips_the_same_steps(tmp_path):
    """Under DDP a non-finite loss or gradient norm on one process makes every process skip the update."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_guard_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == results[1] == ([False, True, False], 2, 1)


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path, monkeypatch):
    from calibrl.train import Trainer

    def poison_after_warm_start(self):
        if self.phase == "rl":
            with torch.no_grad():
                next(self.policy.model.parameters()).fill_(float("nan"))
        return original(self)

    original = Trainer.save
    monkeypatch.setattr(Trainer, "save", poison_after_warm_start)
    out = tmp_path / "nan-weights"
    assert quick_run(out, "--max-steps", "1") == FAILED_EXIT_CODE
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))][-1] == "ckpt-0000002.pt"
    assert all(checkpoint.verify_checkpoint(p) is None for p in checkpoint.list_checkpoints(str(out)))


# --------------------------------------------------------------------------------------------- data
def _image(folder, name, size, corrupt=False):
    path = folder / name
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if corrupt:
        path.write_bytes(path.read_bytes()[:40])  # a PNG header and nothing decodable
    return name


def _row(image, question="what color is the shape?", answer="red"):
    return {
        "image": image,
        "question": question,
        "answer": answer,
        "expert": f"<think>a {answer} shape.</think><answer>{answer}</answer>",
    }


@pytest.fixture
def bad_data(tmp_path):
    """A JSONL file of 8 good rows and 4 bad ones (lines 3, 6, 9, 12), and the list of its lines."""
    good = _image(tmp_path, "good.png", (32, 32))
    bad = {
        3: json.dumps(_row(_image(tmp_path, "corrupt.png", (32, 32), corrupt=True))),
        6: json.dumps(_row(_image(tmp_path, "thin.png", (2, 600)))),  # aspect ratio 300: the processor refuses
        9: json.dumps(_row(good, question="what is <|image_pad|> here?")),
        12: json.dumps(_row(good))[:-2].encode() + b'\xff\xfe"}',
    }
    lines = []
    for line_no in range(1, 13):
        line = bad.get(line_no, json.dumps(_row(good, answer=("red", "blue")[line_no % 2])))
        lines.append(line if isinstance(line, bytes) else line.encode())
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, lines


def test_bad_rows_are_refused_by_file_line_or_skipped_and_a_corrected_file_resumes(tmp_path, bad_data, capsys):
    path, lines = bad_data
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        quick_run(out, "--data", path)
    assert exit_info.value.code == 2
    assert f"data: {path}:12: invalid UTF-8" in capsys.readouterr().err  # the file-level check comes first
    path.write_bytes(b"\n".join(lines[:11]) + b"\n\n")  # without line 12: the row checks against the policy
    with pytest.raises(SystemExit):
        quick_run(out, "--data", path)
    error = capsys.readouterr().err
    assert f"data: {path}:3: image" in error and "does not decode" in error and "--skip-bad-rows" in error
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert quick_run(out, "--data", path, "--skip-bad-rows", "--max-steps", "1") == 0
    printed = capsys.readouterr().out
    assert "skipped 4 bad data row(s)" in printed
    for line_no, why in (
        (3, "does not decode"),
        (6, "refused by the image processor"),
        (9, "special token(s) ['<|image_pad|>']"),
        (12, "invalid UTF-8"),
    ):
        assert f"{path}:{line_no}: " in printed and why in printed
    # the corrected file (same rows, bad ones fixed in place) resumes, with a warning naming the changes
    fixed = [json.dumps(_row("good.png", answer=("red", "blue")[n % 2])).encode() for n in range(1, 13)]
    path.write_bytes(b"\n".join(fixed) + b"\n")
    with pytest.warns(UserWarning, match=r"4 row\(s\) of data .* differ from the run's \(first: .*data.jsonl:3\)"):
        assert quick_run(out, "--resume", out, "--data", path, "--max-steps", "2") == 0
    assert [r["step"] for r in rl_records(out)] == [1, 2]
    # rows added or removed would change the prompt order: refused, naming both counts
    path.write_bytes(b"\n".join(fixed[:-1]) + b"\n")
    with pytest.raises(SystemExit):
        quick_run(out, "--resume", out, "--data", path, "--max-steps", "3")
    assert "has 11 rows, the run was trained on 12" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_metrics_line_is_dropped_with_a_warning_and_resume_continues(tmp_path):
    out = tmp_path / "torn"
    assert quick_run(out, "--max-steps", "2") == 0
    with open(metrics_path(str(out)), "ab") as handle:
        handle.write(b'{"phase": "rl", "step": 3, "rew')  # a short write on a full disk
    with pytest.warns(TornLineWarning, match=r"metrics.jsonl:\d+: dropping a torn last line"):
        assert [r["step"] for r in rl_records(out)] == [1, 2]
    with pytest.warns(TornLineWarning):
        assert quick_run(out, "--resume", out, "--max-steps", "3") == 0
    assert [r["step"] for r in rl_records(out)] == [1, 2, 3]  # the torn line is gone


# ------------------------------------------------------------------------------------ full disk
def test_a_full_disk_while_checkpointing_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def disk_fills_at_index_3(obj, handle):
        if obj.get("phase") == "rl" and obj.get("step") == 1:
            handle.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4178")
        return real_save(obj, handle)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_at_index_3)
    out = tmp_path / "full"
    assert quick_run(out, "--max-steps", "2") == FAILED_EXIT_CODE
    error = capsys.readouterr().err
    assert "no space left on device while writing checkpoint" in error and "ckpt-0000003.pt" in error
    names = sorted(os.listdir(checkpoint.checkpoint_dir(str(out))))
    assert names == ["ckpt-0000001.pt", "ckpt-0000001.pt.sha256", "ckpt-0000002.pt", "ckpt-0000002.pt.sha256"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert quick_run(out, "--resume", out, "--max-steps", "2") == 0


# -------------------------------------------------------------------------------- checkpoint trust
def test_a_newest_checkpoint_of_another_format_falls_back(tmp_path):
    out = tmp_path / "format"
    assert quick_run(out, "--max-steps", "2") == 0
    newest = checkpoint.latest_checkpoint(str(out))
    state = checkpoint.load_checkpoint(newest)
    state["weights"] = state.pop("model")  # a renamed key, written (with a valid checksum) by another version
    checkpoint.save_checkpoint(str(out), 4, state, keep=0)
    with pytest.warns(checkpoint.CheckpointWarning, match=r"ckpt-0000004.pt: not a trainer checkpoint .*'model'"):
        assert quick_run(out, "--resume", out, "--max-steps", "3") == 0
    assert [r["step"] for r in rl_records(out)] == [1, 2, 3]


def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "locked"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from calibrl.run_lock import RunLock; "
            f"lock = RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exit_info:
            quick_run(out)
        assert exit_info.value.code == 2
        assert f"is in use by another trainer (pid {holder.pid}" in capsys.readouterr().err
        assert not os.path.exists(out / "config.json")  # the first trainer's folder is untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file (naming a dead pid) is taken over
    assert json.loads((out / "trainer.lock").read_text())["pid"] == holder.pid
    assert quick_run(out, "--max-steps", "1") == 0
    assert not os.path.exists(out / "trainer.lock")  # released at exit


def test_jsonl_lines_are_appended_whole_and_only_a_torn_last_line_is_tolerated(tmp_path, monkeypatch):
    from calibrl.run_log import append_line, read_records

    path = str(tmp_path / "metrics.jsonl")
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    append_line(path, {"phase": "rl", "step": 1, "text": "x" * 100_000})
    append_line(path, {"phase": "rl", "step": 2})
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)  # one write a line
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:10]))  # the disk fills up
    with pytest.raises(OSError, match=r"short write to .*metrics.jsonl: 10 of \d+ bytes"):
        append_line(path, {"phase": "rl", "step": 3})
    monkeypatch.setattr(os, "write", real_write)
    with pytest.warns(TornLineWarning, match=r"metrics.jsonl:3: dropping a torn last line \(10 bytes"):
        assert [r["step"] for r in read_records(path)] == [1, 2]
    with open(path, "ab") as handle:  # a record after the torn line: corruption inside the file, not a torn tail
        handle.write(b"\n" + json.dumps({"phase": "rl", "step": 4}).encode() + b"\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        read_records(path)
