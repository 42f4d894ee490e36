"""The same script under torchrun with 2 CPU processes (gloo): prompts sharded, group statistics gathered.

One torchrun launch (tests/_train_ddp_worker.py) runs every DDP case, with scripted rewards so that the
updates are not zero; each case is then checked against a one-process run of the same prompts.
"""

import json
import os
import subprocess

import pytest
import torch

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from _train_helpers import (
    all_finite,
    comparable,
    metrics,
    quick_run,
    rl_records,
    rows_by_key,  # noqa: E402
    update_gradients,
)

from calibrl import checkpoint, distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--quick", "--device", "cpu", "--no-tensorboard"]
# --algo luffy keeps expert rows, --mix-ratio 0.5 drops some: processes hold different numbers of rows, and
# with 1 row per micro-batch a process runs zero-weight passes to match the other's pass count.
MIXED = [
    "--prompts-per-step",
    "4",
    "--sft-batch-size",
    "4",
    "--algo",
    "luffy",
    "--mix-ratio",
    "0.5",
    "--micro-batch-rows",
    "1",
    "--seed",
    "3",
]
# Gradient checks (grpo: a per-sequence aggregation, so any split into micro-batches gives the same gradient):
# "one group each": --quick's P = 2 with 2 mini-batches, each mini-batch's group on one process (the other
# runs a zero-weight pass); "uneven rows": P = 4 in one mini-batch of 3-row micro-batches, process 1 without
# its expert rows (6 rows: 2 passes + 1 zero-weight pass against process 0's 8 rows: 3 passes).
GRADIENT_CHECKS = {
    "one group each": (["--algo", "grpo"], None),
    "uneven rows": (
        [
            "--algo",
            "grpo",
            "--prompts-per-step",
            "4",
            "--sft-batch-size",
            "4",
            "--mini-batches",
            "1",
            "--micro-batch-rows",
            "3",
        ],
        1,
    ),
}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Run dirs of: plain --quick (2 steps, then resumed to 3), the same uninterrupted, and the MIXED case."""
    root = tmp_path_factory.mktemp("ddp")
    dirs = {name: root / name.replace(" ", "-") for name in ("quick", "uninterrupted", "mixed", *GRADIENT_CHECKS)}
    checks = [{"out": str(dirs[name]), "flags": flags, "drop": drop} for name, (flags, drop) in GRADIENT_CHECKS.items()]
    runs = [
        COMMON + ["--out", str(dirs["quick"]), "--max-steps", "2"],  # P = 2: one group per process
        COMMON + ["--out", str(dirs["quick"]), "--resume", str(dirs["quick"]), "--max-steps", "3"],
        COMMON + ["--out", str(dirs["uninterrupted"]), "--max-steps", "3"],
        COMMON + ["--out", str(dirs["mixed"])] + MIXED,
    ]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    worker = os.path.join(ROOT, "tests", "_train_ddp_worker.py")
    cmd = distributed.torchrun_command(2, worker, json.dumps({"runs": runs, "gradient_checks": checks}))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dirs


def _ddp_log(run_dir, run=0):
    """The scripted_rewards log of both processes for the run-th run in ``run_dir``."""
    log = []
    for rank in (0, 1):
        with open(run_dir / f"stats-rank{rank}.json") as handle:
            log += json.loads(handle.read().splitlines()[run])
    return log


@pytest.mark.slow
def test_plain_quick_settings_under_two_processes(ddp_runs):
    """--quick has 2 prompts per step and 2 mini-batches: one group per process, each mini-batch on one process."""
    out = ddp_runs["quick"]
    for rank in (0, 1):
        assert (out / f"exit-rank{rank}.json").read_text().split() == ["0", "0"]
    rl = rl_records(out)
    assert [r["step"] for r in rl] == [1, 2, 3]
    for record in rl:
        assert all_finite(record) and record["sampled_tokens"] > 0
        assert len(record["group_pass_rate"]) == 2  # statistics of every process's groups, gathered
        assert record["grad_norm"] > 0 and record["guide_loss"] != 0  # real updates (scripted rewards)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(out)))
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # each process's RNG is saved
    assert not (state["rng"][0]["torch"] == state["rng"][1]["torch"]).all()  # processes sample differently


@pytest.mark.slow
def test_resume_under_two_processes_matches_an_uninterrupted_run(ddp_runs):
    assert comparable(metrics(ddp_runs["quick"])) == comparable(metrics(ddp_runs["uninterrupted"]))


@pytest.mark.slow
@pytest.mark.parametrize("case, flags", [("quick", []), ("mixed", MIXED)])
def test_group_statistics_equal_a_single_process_run(ddp_runs, tmp_path, case, flags):
    """Same prompts, rewards, advantages and pass flags per (step, group, row) as one process computes."""
    single = []
    assert quick_run(tmp_path / "single", "--max-steps", "2", *flags, log=single) == 0
    expected, got = rows_by_key(single), rows_by_key(_ddp_log(ddp_runs[case]))
    assert got.keys() == expected.keys()
    assert {key[1] for key in got} == set(range(4 if flags else 2))
    for key, (prompt, reward, advantage, passed) in expected.items():
        assert got[key][0] == prompt and got[key][1] == pytest.approx(reward) and got[key][3] == passed
        assert got[key][2] == pytest.approx(advantage, abs=1e-6)
    assert any(abs(a) > 0.1 for _, _, a, _ in got.values())


@pytest.mark.slow
def test_different_row_counts_and_micro_batches_under_two_processes(ddp_runs):
    out = ddp_runs["mixed"]
    rl = rl_records(out)
    assert [r["step"] for r in rl] == [1, 2]
    for record in rl:
        assert all_finite(record) and record["grad_norm"] > 0
        assert len(record["group_pass_rate"]) == 4
    # the mix-ratio draw left the processes with different numbers of rows (expert rows kept) in some step,
    # so with one row per micro-batch one process ran more passes than its rows (zero-weight ones)
    rows = [json.loads((out / f"update-rows-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(6 <= n <= 8 for n in rows[0] + rows[1])  # 2 groups x (3 on-policy rows + 0 or 1 expert row)
    assert rows[0] != rows[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", GRADIENT_CHECKS)
def test_update_gradients_equal_a_single_process_update(ddp_runs, tmp_path, case):
    """Each optimizer step's gradient after DDP's all-reduce equals one process's on the same rows: the
    mini-batches over all processes' groups, the loss-row weights and the zero-weight passes add up."""
    flags, drop = GRADIENT_CHECKS[case]
    got = torch.load(ddp_runs[case] / "gradients.pt")
    expected = update_gradients(flags + ["--out", str(tmp_path)], distributed.DistInfo(0, 1, torch.device("cpu")), drop)
    assert len(got) == len(expected) == (2 if case == "one group each" else 1)
    assert all(g.abs().sum() > 0 for g in expected)
    # one process deals its shuffled groups to the mini-batches in another order: match them up
    for gradient in got:
        error = min(float((gradient - e).abs().max()) for e in expected)
        assert error < 1e-6 * float(gradient.abs().max()) + 1e-7, error
