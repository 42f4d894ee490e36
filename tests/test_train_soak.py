"""Soak: a test-sized run of 120 RL steps with checkpoints and evaluations, resident memory
sampled after every step: after a warm-up of 30 steps it must not grow (a leak of anything per step, such
as a kept batch, graph or log record, shows as a steady slope)."""

import os

import pytest

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

from _train_helpers import scripted_rewards  # noqa: E402

from calibrl.train import Trainer, main  # noqa: E402

STEPS, WARMUP = 120, 30
MAX_GROWTH_MB = 4.0  # after warm-up, over 90 steps (measured: 0.3 MB, allocator noise)
MAX_SLOPE_MB_PER_STEP = 0.02  # least-squares slope after warm-up (measured: ~0.004)


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_memory_does_not_grow_over_many_steps(tmp_path, monkeypatch):
    samples = []
    original = Trainer.rl_step

    def sampled_step(self):
        record = original(self)
        samples.append(resident_mb())
        return record

    monkeypatch.setattr(Trainer, "rl_step", sampled_step)
    with scripted_rewards():
        assert (
            main(
                [
                    "--quick",
                    "--out",
                    str(tmp_path / "soak"),
                    "--no-tensorboard",
                    "--max-steps",
                    str(STEPS),
                    "--save-every",
                    "10",
                    "--eval-every",
                    "20",
                ]
            )
            == 0
        )
    assert len(samples) == STEPS
    after = samples[WARMUP:]
    n = len(after)
    mean_x, mean_y = (n - 1) / 2, sum(after) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(after)) / sum((x - mean_x) ** 2 for x in range(n))
    growth = max(after) - after[0]
    print(
        f"soak: RSS {samples[0]:.1f} MB at step 1, {after[0]:.1f} at step {WARMUP + 1}, {samples[-1]:.1f} at "
        f"step {STEPS}; growth after warm-up {growth:.2f} MB, slope {slope:.4f} MB/step"
    )
    assert growth < MAX_GROWTH_MB and slope < MAX_SLOPE_MB_PER_STEP
