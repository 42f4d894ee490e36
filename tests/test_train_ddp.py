"""The same script under torchrun with 2 CPU processes (gloo): prompts sharded, group statistics gathered."""

import os
import subprocess
import sys

import pytest

from calibrl import checkpoint

from _train_helpers import all_finite, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(out, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "calibrl.train",
           "--quick", "--out", str(out), "--no-tensorboard", "--device", "cpu", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    # 4 prompts per step = 2 per process; 2 mini-batches = 1 group per optimizer step on each process
    result = _torchrun(out, "--prompts-per-step", "4", "--sft-batch-size", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rl = [r for r in metrics(out) if r["phase"] == "rl" and r["step"] > 0]
    assert [r["step"] for r in rl] == [1, 2]
    for record in rl:
        assert all_finite(record)
        assert len(record["group_pass_rate"]) == 4  # statistics of every process's groups, gathered
        assert record["sampled_tokens"] > 0
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(out)))
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # each process's RNG is saved
    assert not (state["rng"][0]["torch"] == state["rng"][1]["torch"]).all()  # processes sample differently
    # resuming with the same number of processes continues the run
    resumed = _torchrun(out, "--resume", str(out), "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if r["phase"] == "rl"] == [0, 1, 2, 3]
