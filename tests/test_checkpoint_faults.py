"""Checkpoint faults (issue 17): truncated, tampered, half-written and malicious checkpoints.

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
