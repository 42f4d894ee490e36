"""Checkpoint faults: truncated, tampered, half-written and malicious checkpoints.

Each fault is injected into a real checkpoint folder written by ``save_checkpoint``; ``load_latest`` (what
``--resume`` uses) must skip the bad newest file with a warning naming it and why, and fall back to the
previous good one; a pickle that would run code is refused by ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from calibrl import checkpoint
from calibrl.config import ConfigError


def _state(step):
    return {"step": step, "model": {"w": torch.full((64, 8), float(step))}, "rng": checkpoint.capture_rng()}


@pytest.fixture
def run_dir(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), step, _state(step), keep=3)
    return str(tmp_path)


def _newest(run_dir):
    return checkpoint.list_checkpoints(run_dir)[-1]


def test_good_checkpoints_verify_and_load(run_dir):
    assert [checkpoint.verify_checkpoint(p) for p in checkpoint.list_checkpoints(run_dir)] == [None] * 3
    path, state = checkpoint.load_latest(run_dir)
    assert path == _newest(run_dir) and state["step"] == 3 and float(state["model"]["w"][0, 0]) == 3.0
    checkpoint.restore_rng(state["rng"])  # the RNG state round-trips through weights_only


@pytest.mark.parametrize("fault", ["truncated", "flipped-byte", "no-checksum", "checksum-garbage"])
def test_a_bad_newest_checkpoint_falls_back_to_the_previous_good_one(run_dir, fault):
    newest = _newest(run_dir)
    if fault == "truncated":
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) // 2)
    elif fault == "flipped-byte":
        with open(newest, "r+b") as f:
            f.seek(os.path.getsize(newest) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif fault == "no-checksum":  # killed between the data rename and the checksum's
        os.remove(checkpoint.checksum_path(newest))
    else:
        with open(checkpoint.checksum_path(newest), "w") as f:
            f.write("{not json")
    with pytest.warns(checkpoint.CheckpointWarning, match=os.path.basename(newest)) as caught:
        path, state = checkpoint.load_latest(run_dir)
    assert state["step"] == 2 and path == checkpoint.list_checkpoints(run_dir)[-2]
    assert "falling back to" in str(caught[0].message)
    with pytest.raises(checkpoint.CheckpointError, match=os.path.basename(newest)):
        checkpoint.load_checkpoint(newest)


def test_no_usable_checkpoint_is_a_resume_error(run_dir):
    for path in checkpoint.list_checkpoints(run_dir):
        os.remove(checkpoint.checksum_path(path))
    with pytest.warns(checkpoint.CheckpointWarning), pytest.raises(ConfigError, match="no usable checkpoint"):
        checkpoint.load_latest(run_dir)


class _Payload:
    """Unpickling this would create the marker file (code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / "ckpt-0000009.pt"
    torch.save({"step": 9, "evil": _Payload(str(marker))}, str(path))
    assert not marker.exists()
    # A valid checksum, as an attacker who can write the folder would also write: only weights_only stops it.
    record = {"file": path.name, "bytes": path.stat().st_size, "sha256": checkpoint.file_sha256(str(path))}
    (folder / (path.name + checkpoint.CHECKSUM_SUFFIX)).write_text(json.dumps(record))
    assert checkpoint.verify_checkpoint(str(path)) is None
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load_checkpoint(str(path))
    with pytest.warns(checkpoint.CheckpointWarning), pytest.raises(ConfigError):
        checkpoint.load_latest(str(tmp_path))
    assert not marker.exists()


def test_leftovers_of_a_killed_writer_are_ignored_and_cleaned(run_dir):
    folder = checkpoint.checkpoint_dir(run_dir)
    half = os.path.join(folder, "ckpt-0000004.pt.tmp-99999")  # a torch.save cut short by SIGKILL
    with open(half, "wb") as f:
        f.write(b"PK\x03\x04 partial")
    path, state = checkpoint.load_latest(run_dir)
    assert state["step"] == 3
    checkpoint.save_checkpoint(run_dir, 4, _state(4), keep=2)
    names = sorted(os.listdir(folder))
    assert not any(".tmp-" in n for n in names)
    assert names == ["ckpt-0000003.pt", "ckpt-0000003.pt.sha256", "ckpt-0000004.pt", "ckpt-0000004.pt.sha256"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),  # errno.ENOSPC from a plain write
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4178"),  # torch's short write
    ],
)
def test_a_full_disk_is_reported_as_such_and_older_checkpoints_stay(run_dir, monkeypatch, failure):
    def fails_midway(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", fails_midway)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"no space left on device while writing checkpoint "
        r".*ckpt-0000004\.pt \(.* MiB free in .*intact",
    ):
        checkpoint.save_checkpoint(run_dir, 4, _state(4), keep=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(run_dir)] == [
        "ckpt-0000001.pt",
        "ckpt-0000002.pt",
        "ckpt-0000003.pt",
    ]  # nothing pruned, nothing half-written left
    assert not [n for n in os.listdir(checkpoint.checkpoint_dir(run_dir)) if ".tmp-" in n]
    assert checkpoint.load_latest(run_dir)[1]["step"] == 3


def test_another_write_failure_names_its_cause(run_dir, monkeypatch):
    def fails(obj, handle):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "save", fails)
    with pytest.raises(checkpoint.CheckpointError, match=r"OSError: \[Errno 5\] Input/output error while writing"):
        checkpoint.save_checkpoint(run_dir, 4, _state(4), keep=2)


def test_a_checkpoint_restored_under_another_index_is_never_trusted(run_dir):
    folder = checkpoint.checkpoint_dir(run_dir)
    with open(checkpoint.checksum_path(os.path.join(folder, "ckpt-0000003.pt"))) as f:
        assert json.load(f)["index"] == 3  # the checksum file names the file and its index
    for suffix in ("", checkpoint.CHECKSUM_SUFFIX):  # an old step-1 checkpoint copied back as the newest
        with (
            open(os.path.join(folder, "ckpt-0000001.pt" + suffix), "rb") as src,
            open(os.path.join(folder, "ckpt-0000009.pt" + suffix), "wb") as dst,
        ):
            dst.write(src.read())
    copy = os.path.join(folder, "ckpt-0000009.pt")
    assert "written for ckpt-0000001.pt (index 1)" in checkpoint.verify_checkpoint(copy)
    with pytest.warns(checkpoint.CheckpointWarning, match="ckpt-0000009.pt: its checksum file was written for"):
        path, state = checkpoint.load_latest(run_dir)
    assert state["step"] == 3
    checkpoint.save_checkpoint(run_dir, 4, _state(4), keep=2)  # pruning keeps the good 3 and 4
    assert [checkpoint.verify_checkpoint(os.path.join(folder, f"ckpt-000000{i}.pt")) for i in (3, 4)] == [None] * 2


def test_the_trainer_format_is_checked_and_newer_versions_warn():
    good = {key: kind() for key, kind in checkpoint.TRAINER_STATE.items()}
    assert checkpoint.trainer_state_problem(good) is None
    renamed = {**good, "weights": good["model"]}
    del renamed["model"]
    assert "missing key(s) ['model']" in checkpoint.trainer_state_problem(renamed)
    assert "step is a str, expected int" in checkpoint.trainer_state_problem({**good, "step": "3"})
    newer = {**good, "format_version": checkpoint.FORMAT_VERSION + 1, "ema": {}}
    with pytest.warns(checkpoint.CheckpointWarning, match=r"format version 2 is newer.*ignoring key\(s\) \['ema'\]"):
        assert checkpoint.trainer_state_problem(newer) is None


def test_settings_of_a_newer_version_are_ignored_with_a_warning_naming_them():
    from calibrl.config import SettingsWarning, TrainConfig, config_from_dict

    saved = {**TrainConfig().to_dict(), "lr": 1e-4, "ema_decay": 0.99, "curriculum": "easy-first"}
    with pytest.warns(SettingsWarning, match=r"ckpt-7.pt: ignoring setting\(s\) \['curriculum', 'ema_decay'\]"):
        assert config_from_dict(saved, "ckpt-7.pt").lr == 1e-4


def test_one_trainer_per_run_folder(tmp_path):
    from calibrl.run_lock import RunLock

    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(ConfigError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(tmp_path / "trainer.lock")
    (tmp_path / "trainer.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone"}))  # a dead owner
    second = RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / "trainer.lock").read_text())["pid"] == os.getpid()
    second.release()
