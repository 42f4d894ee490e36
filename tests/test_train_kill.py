"""SIGKILL during a real run: at each stage of a checkpoint write, and at random moments.

Every killed run is continued with ``--resume``; the continued run must load a good checkpoint (the
newest complete one), finish, and log every step exactly once. The checksum and atomic-rename logic
itself is unit-tested in test_checkpoint_faults.py; here the real trainer process dies.
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from calibrl import checkpoint  # noqa: E402
from calibrl.run_log import read_metrics  # noqa: E402
from calibrl.train import main  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 4  # RL steps; --quick has 2 warm-start steps and saves every step: checkpoints 1 .. 6
FLAGS = ["--quick", "--no-tensorboard", "--max-steps", str(STEPS)]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _resume_to_the_end(out, steps=STEPS):
    assert main([*FLAGS[:-1], str(steps), "--out", str(out), "--resume", str(out)]) == 0
    records = read_metrics(str(out))
    assert [r["step"] for r in records if r["phase"] == "rl" and r["step"] > 0] == list(range(1, steps + 1))
    assert [r["step"] for r in records if r["phase"] == "sft"] == [1, 2]
    path, state = checkpoint.load_latest(str(out))
    assert (state["phase"], state["step"]) == ("rl", steps)
    leftovers = [n for n in os.listdir(checkpoint.checkpoint_dir(str(out))) if ".tmp-" in n]
    assert not leftovers


@pytest.mark.parametrize("stage, resumes_from", [("data-half", 2), ("before-checksum", 2), ("before-prune", 3)])
def test_sigkill_inside_a_checkpoint_write_then_resume(tmp_path, stage, resumes_from):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, os.path.join(HERE, "_kill_during_save.py"), stage, "3", *FLAGS, "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.warns(UserWarning) if stage == "before-checksum" else contextlib.nullcontext():
        path, state = checkpoint.load_latest(str(out))
    assert os.path.basename(path) == f"ckpt-{resumes_from:07d}.pt"  # the newest complete checkpoint
    _resume_to_the_end(out)


def _newest_index(out):
    paths = checkpoint.list_checkpoints(str(out))
    return int(os.path.basename(paths[-1])[5:12]) if paths else 0


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Three runs, each killed at a random moment after it wrote a new checkpoint (saves are every step,
    so a kill often lands inside one); then a last resume finishes the run."""
    out = tmp_path / "run"
    steps = 10
    rng = random.Random(17)
    kills = 0
    for _ in range(3):
        seen = _newest_index(out)
        resume = ["--resume", str(out)] if seen else []
        process = subprocess.Popen(
            [sys.executable, "-m", "calibrl.train", *FLAGS[:-1], str(steps), "--out", str(out), *resume],
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 240
        while process.poll() is None and _newest_index(out) <= seen and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=300)
    assert kills >= 2
    _resume_to_the_end(out, steps)
