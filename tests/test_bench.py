"""The benchmarks run at tiny sizes, write well-formed long-format CSV, plot and tabulate; the GPU check
keeps its plan, budget and publishing. No timing is asserted: only that every entry point executes, that
rows have the exact columns and sane values, that providers compute the same loss, and that failures
are recorded instead of raised.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench import bench_train, harness, runner, table
from bench.harness import CSV_COLUMNS
from bench.runner import SUITES, Sweep, all_ops, forced_impl

REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPS = all_ops()


def options(out, *args):
    return runner.parser("bench", sorted(OPS)).parse_args(["--out", str(out), "--no-train", *args])


def events(path: Path):
    with open(path.with_name(path.stem + ".events.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_well_formed(path: Path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [dict(zip(header, row)) for row in reader]
    assert header == list(CSV_COLUMNS)
    assert rows, f"{path} has no rows"
    for row in rows:
        assert None not in row and len(row) == len(CSV_COLUMNS)
        assert row["mode"] in ("forward", "full") and row["metric"] in ("speed", "memory")
        values = [float(row[key]) for key in ("p20", "p50", "p80")]
        if not any(math.isnan(v) for v in values):
            assert values[0] <= values[1] <= values[2]
        float(row["x"])
        assert row["device"] == harness.device_name(CPU)
        assert row["version"].startswith(__import__("calibrl_kernels").__version__)
    return rows


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """The tiny suite (every op; compiled off), run once in this process."""
    out = tmp_path_factory.mktemp("bench_tiny")
    return runner.run_suite("tiny", list(OPS.values()), options(out, "--mem-cap-gib", "2"))


def test_tiny_suite_writes_every_op_and_provider(tiny_results):
    rows = check_well_formed(tiny_results / "kernels.csv")
    assert {row["kernel"] for row in rows} == set(OPS)
    for name, op in OPS.items():
        at = [row for row in rows if row["kernel"] == name]
        assert {"calibrl", "calibrl-torch", "eager", "roofline"} <= {row["provider"] for row in at}, name
        for row in at:
            if row["provider"] != "roofline":
                assert math.isfinite(float(row["p50"])) and float(row["p50"]) >= 0, row
                assert row["unit"] == ("ms" if row["metric"] == "speed" else "MiB")
            elif row["metric"] == "speed":
                assert float(row["p50"]) > 0
        modes = {row["mode"] for row in at if row["provider"] == "calibrl"}
        assert modes == ({"forward", "full"} if op.differentiable else {"forward"})
    liger = [row for row in rows if row["kernel"] == "fused_linear_calibrl_loss" and row["provider"] == "liger"]
    assert liger and all(math.isfinite(float(row["p50"])) for row in liger)  # Liger's GRPO loss runs on CPU
    skipped = {(e["kernel"], e["provider"]) for e in events(tiny_results / "kernels.csv") if e["kind"] == "skipped"}
    assert ("fused_calibrl_loss", "liger") in skipped and ("token_logprobs", "liger") in skipped


def test_tiny_suite_renders_plots_and_table(tiny_results):
    for name in OPS:
        pngs = list(tiny_results.glob(f"{name}__*.png"))
        assert pngs and pngs[0].read_bytes()[:8] == PNG_MAGIC, name
    text = (tiny_results / "tables.md").read_text()
    assert text.startswith("Measured on cpu-") and "| calibrl-torch |" in text


def test_forced_impl_restores_the_environment(monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", "torch")
    with forced_impl(None):
        assert "CALIBRL_IMPL" not in os.environ
    assert os.environ["CALIBRL_IMPL"] == "torch"
    with forced_impl("cpp"):
        assert os.environ["CALIBRL_IMPL"] == "cpp"
    assert os.environ["CALIBRL_IMPL"] == "torch"


def test_calibrl_impl_providers_run_under_their_backend(tmp_path, monkeypatch):
    """``calibrl`` runs with CALIBRL_IMPL unset, ``calibrl-<impl>`` with CALIBRL_IMPL=<impl>, every call."""
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    seen = []
    base = OPS["token_logprobs"]

    def recording(inputs):
        seen.append(os.environ.get("CALIBRL_IMPL"))
        return base.calibrl(inputs)

    op = dataclasses.replace(base, calibrl=recording)
    writer = harness.Writer(tmp_path, "kernels", CPU)
    runner.run_point(
        op,
        Sweep("N", (8,), {"V": 11}, modes=("forward",)),
        {"N": 8, "V": 11},
        SUITES["tiny"],
        CPU,
        writer,
        options(tmp_path, "--impls", "cpp", "torch", "--providers", "calibrl", "calibrl-cpp", "calibrl-torch"),
    )
    assert set(seen) == {None, "cpp", "torch"} and seen.count("torch") == seen.count(None) >= 3
    assert "CALIBRL_IMPL" not in os.environ
    assert {r["provider"] for r in check_well_formed(writer.csv_path)} == {
        "calibrl",
        "calibrl-cpp",
        "calibrl-torch",
        "roofline",
    }


@pytest.mark.parametrize("impl", [None, "torch"])
def test_providers_compute_the_same_loss(impl):
    """calibrl (default backend and the torch one) and eager, compiled's source, agree: like with like."""
    for name, dims in (
        ("fused_calibrl_loss", {"N": 16, "V": 37}),
        ("token_logprobs", {"N": 6, "V": 37}),
        ("fused_linear_calibrl_loss", {"N": 16, "D": 8, "V": 37}),
    ):
        torch.manual_seed(0)
        inputs = OPS[name].build(dims, torch.float32, CPU)
        with forced_impl(impl):
            ours = OPS[name].calibrl(inputs)
        assert float(ours.detach()) != 0.0  # the batch has non-zero advantages: the comparison means something
        torch.testing.assert_close(ours, OPS[name].eager(inputs), rtol=1e-5, atol=1e-6)
    scores = OPS["group_advantages"].build({"B": 16, "G": 4}, torch.float32, CPU)
    torch.testing.assert_close(OPS["group_advantages"].calibrl(scores), OPS["group_advantages"].eager(scores))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs Liger's Triton kernels under the interpreter"
)
def test_liger_logits_providers_run_under_the_triton_interpreter():
    """The GPU-only Liger calls (cross-entropy, GRPO loss on logits) have the right signatures: checked
    on CPU tensors through Triton's interpreter, as if on CUDA."""
    for name, dims in (("token_logprobs", {"N": 8, "V": 37}), ("fused_calibrl_loss", {"N": 16, "V": 37})):
        torch.manual_seed(0)
        inputs = OPS[name].build(dims, torch.float32, CPU)
        with pytest.raises(runner.Unavailable, match="CUDA"):
            OPS[name].liger(inputs, CPU)
        forward, grad_tensors = OPS[name].liger(inputs, torch.device("cuda"))
        loss = forward()
        (grad,) = torch.autograd.grad(loss, grad_tensors)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad_tensors[0] is not inputs["logits"]  # Liger gets its own copy (it writes into its input)
        if name == "token_logprobs":  # -sum(nll) of Liger's cross-entropy is our sum of log-probs
            ours = torch.log_softmax(inputs["logits"].float(), -1).gather(-1, inputs["targets"][:, None]).sum()
            torch.testing.assert_close(loss.float(), ours, rtol=1e-5, atol=1e-5)


def test_failed_provider_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("inductor exploded")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = runner.run_suite(
        "tiny",
        [OPS["group_advantages"]],
        options(tmp_path, "--compiled", "--providers", "compiled", "eager", "--no-plot", "--no-table"),
    )
    rows = check_well_formed(out / "kernels.csv")
    compiled = [row for row in rows if row["provider"] == "compiled" and row["metric"] == "speed"]
    assert compiled and all(math.isnan(float(row["p50"])) for row in compiled)
    assert all(math.isfinite(float(row["p50"])) for row in rows if row["provider"] == "eager")
    failures = [e for e in events(out / "kernels.csv") if e["kind"] == "failed" and e["provider"] == "compiled"]
    assert failures and "inductor exploded" in failures[0]["reason"]


def test_memory_guard_does_not_run_providers_that_materialise_logits(tmp_path):
    out = runner.run_suite(
        "tiny",
        [OPS["fused_calibrl_loss"]],
        options(
            tmp_path,
            "--mem-cap-gib",
            "1e-9",
            "--providers",
            "calibrl",
            "calibrl-torch",
            "eager",
            "--no-plot",
            "--no-table",
        ),
    )
    rows = check_well_formed(out / "kernels.csv")
    guarded = [row for row in rows if row["provider"] in ("calibrl-torch", "eager")]
    assert guarded and all(math.isnan(float(row["p50"])) for row in guarded)  # the torch backend and eager materialise
    assert all(math.isfinite(float(row["p50"])) for row in rows if row["provider"] == "calibrl")
    reasons = [e["reason"] for e in events(out / "kernels.csv") if e["kind"] == "not-run"]
    assert reasons and all("exceeds the memory cap" in why for why in reasons)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the CPU peak is read from /proc (Linux)")
def test_cpu_peak_memory_sees_the_call_and_not_what_came_before():
    garbage = [torch.ones(2**20) for _ in range(16)]  # 64 MiB freed before the call: not the call's
    del garbage
    peak = harness.peak_bytes(lambda: torch.ones(8 * 2**20).sum(), CPU)  # 32 MiB inside the call
    assert 30 * 2**20 <= peak <= 40 * 2**20, peak / 2**20


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler"
)
def test_compiled_provider_runs(tmp_path):
    """The one real torch.compile of the tests (tens of seconds on a CPU when the cache is cold)."""
    op = dataclasses.replace(OPS["token_logprobs"], sweeps={"tiny": [Sweep("N", (8,), {"V": 96})]})
    out = runner.run_suite(
        "tiny",
        [op],
        options(tmp_path, "--compiled", "--providers", "compiled", "compiled-calibrl", "--no-plot", "--no-table"),
    )
    rows = check_well_formed(out / "kernels.csv")
    for provider in ("compiled", "compiled-calibrl"):
        compiled = [row for row in rows if row["provider"] == provider]
        assert compiled and all(math.isfinite(float(row["p50"])) for row in compiled), events(out / "kernels.csv")


def test_train_step_providers_compute_the_same_loss():
    config = bench_train.CONFIGS["tiny"]
    losses = {}
    for name in bench_train.PROVIDERS:
        losses[name] = bench_train.make_step(name, config, config.responses[0], CPU)()
    assert float(losses["eager"]) != 0.0
    torch.testing.assert_close(losses["calibrl"], losses["eager"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["calibrl-logits"], losses["eager"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CSV, tables and plots from hand-made rows
# ---------------------------------------------------------------------------------------------
def write_rows(folder: Path, rows):
    writer = harness.Writer(folder, "kernels", CPU, timestamp="2026-01-01T00:00:00+00:00")
    for kernel, provider, mode, metric, name, x, value in rows:
        writer.row(kernel, provider, mode, metric, "ms" if metric == "speed" else "MiB", name, x, [value] * 3)


def test_table_shows_ratios_to_the_roofline_and_to_calibrl(tmp_path):
    kernel, name = "fused_linear_calibrl_loss", "V; N=1024; D=896; dtype=float32"
    write_rows(
        tmp_path,
        [
            (kernel, "roofline", "full", "speed", name, 8000, 100.0),
            (kernel, "calibrl", "full", "speed", name, 8000, 110.0),
            (kernel, "eager", "full", "speed", name, 8000, 130.0),
            (kernel, "calibrl", "full", "memory", name, 8000, 50.0),
            (kernel, "eager", "full", "speed", name, 32000, math.nan),
        ],
    )
    lines = table.render(tmp_path).splitlines()
    at = lines.index("**fused_linear_calibrl_loss, full, V=8000; N=1024; D=896; dtype=float32**")
    assert lines[at + 2] == "| provider | ms p50 | / roofline | / calibrl | peak above inputs (MiB) |"
    assert lines[at + 4 : at + 7] == [
        "| calibrl | 110 | 1.1 | 1 | 50 |",
        "| eager | 130 | 1.3 | 1.18 | n/a |",
        "| roofline | 100 | 1 | 0.909 | n/a |",
    ]
    assert "| eager | n/a | n/a | n/a | n/a |" in lines


def test_table_cli_renders_png_with_roofline(tmp_path):
    name = "N; D=512; V=32000; dtype=float32"
    rows = [
        ("fused_linear_calibrl_loss", provider, mode, "speed", name, n, value * n)
        for provider, value in (("calibrl", 1.0), ("eager", 1.2), ("roofline", 0.7))
        for mode in ("forward", "full")
        for n in (512, 1024, 2048)
    ]
    rows += [("fused_linear_calibrl_loss", "calibrl", "full", "memory", name, n, 70.0) for n in (512, 1024, 2048)]
    write_rows(tmp_path, rows)
    assert table.main([str(tmp_path), "--plots"]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == PNG_MAGIC
    assert table.plot(tmp_path / "kernels.csv", tmp_path / "png") == [tmp_path / "png" / pngs[0].name]


def test_csv_writer_refuses_a_foreign_header(tmp_path):
    (tmp_path / "other.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="expected the header"):
        harness.Writer(tmp_path, "other", CPU)
    with pytest.raises(ValueError, match="metric"):
        harness.Writer(tmp_path, "ok", CPU).row("k", "p", "full", "latency", "ms", "N", 1, [1, 2, 3])


def test_sweep_points_have_stable_names_and_valid_sizes():
    points = list(Sweep("N", (8, 16), {"V": 96, "D": 16}).points())
    assert points == [{"N": 8, "D": 16, "V": 96}, {"N": 16, "D": 16, "V": 96}]
    assert harness.x_name("N", {"D": 16, "V": 96, "dtype": "float32"}) == "N; D=16; V=96; dtype=float32"
    for op in OPS.values():  # every configured token count splits into a valid batch
        for sweeps in op.sweeps.values():
            for sweep in sweeps:
                for dims in sweep.points():
                    if "N" in dims and op.name != "token_logprobs":
                        runner.split_tokens(dims["N"])
    assert {part for suite in SUITES.values() for part in suite.parts} == {
        part for op in OPS.values() for part in op.sweeps
    }


# ---------------------------------------------------------------------------------------------
# gpu_check.sh
# ---------------------------------------------------------------------------------------------
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def _script_env(tmp_path, **extra):
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(tmp_path))
    env.pop("OUT", None)
    env.update(extra)
    return env


GPU_CHECK_STEPS = ("environment", "kernels", "tests", "train", "trainer", "report", "sweeps")
PUBLISHED_FILES, PUBLISHED_FILE_BYTES = 7, 15 * 2**20  # the published set's caps (GPU_CHECK_MAX_FILE_MB default)


def _plan(text):
    """{step: limit in seconds or 'rest'} and the budget, from the plan gpu_check.sh prints."""
    budget = int(re.search(r"gpu_check plan \(budget (\d+)s", text).group(1))
    limits = dict(re.findall(r"^  (\w+): limit (\d+s|rest)$", text, flags=re.M))
    return {k: (v if v == "rest" else int(v[:-1])) for k, v in limits.items()}, budget


def test_gpu_check_plan_fits_its_budget():
    """Six minutes at most by default, step limits within the budget, most valuable steps first."""
    done = subprocess.run(["bash", str(GPU_CHECK), "--plan"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    limits, budget = _plan(done.stdout)
    assert tuple(limits) == GPU_CHECK_STEPS and limits["sweeps"] == "rest"
    assert budget <= 360
    assert sum(v for v in limits.values() if v != "rest") <= budget - 10  # the last publish keeps 10 s
    assert "published to $OUT after every step" in done.stdout


def _check_published(out):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= PUBLISHED_FILES, files
    for path in files:
        assert len(path.relative_to(out).parts) <= 3, path  # $OUT/a/b/file at the deepest
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path
        assert path.stat().st_size <= PUBLISHED_FILE_BYTES, path
    return {p.name for p in files}


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    results = tmp_path / "results"
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"],
        # the report step draws the plots; a loaded 2-core host can need more than the GPU host's 15 s for it
        env=_script_env(results, OUT=str(out), REPORT_TIMEOUT="60"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (results / "gpu_check.log").read_text()
    limits, _ = _plan(log)
    assert tuple(limits) == GPU_CHECK_STEPS
    for name in ("tests", "sweeps"):
        assert f"step {name} (dry run, not run; limit {limits[name]}" in log
    starts = [log.index(f"step {name} (") for name in GPU_CHECK_STEPS]
    assert starts == sorted(starts), "steps run in the plan's order"
    for name in ("environment", "kernels", "train", "trainer", "report"):  # each step publishes when it ends
        ended = log.index(f"step {name}: ok")
        assert "published" in log[ended:].splitlines()[1], log[ended : ended + 300]
    assert "every step passed" in log
    check_well_formed(results / "kernels.csv")
    train_rows = check_well_formed(results / "train.csv")
    assert {row["provider"] for row in train_rows} >= {"calibrl", "calibrl-logits", "eager"}
    assert all(math.isfinite(float(row["p50"])) for row in train_rows)
    assert any(p.read_bytes()[:8] == PNG_MAGIC for p in results.glob("train_step__*.png"))
    assert (results / "tables.md").read_text().startswith("Measured on")
    published = _check_published(out)
    assert published >= {"gpu_check.log", "steps.log", "kernels.csv", "train.csv", "tables.md", "results.tar.gz"}
    assert (out / "kernels.csv").read_bytes() == (results / "kernels.csv").read_bytes()
    assert "===== step train" in (out / "steps.log").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("kernels.csv") for n in names)
    assert not any("checkpoints" in n or n.endswith(".pt") for n in names), names
    if importlib.util.find_spec("easy_vqa") and importlib.util.find_spec("tokenizers"):
        assert "step trainer: ok" in log
        metrics = (results / "trainer_quick" / "metrics.jsonl").read_text().splitlines()
        assert any('"phase": "rl"' in line for line in metrics), metrics[-3:]
        assert not list(results.rglob("*.pt")), "the trainer's checkpoints stay out of the results"
    else:
        assert "step trainer: skipped" in log


def _fake_python_run(tmp_path, **extra):
    """gpu_check.sh --dry-run with a python that prints a line and hangs (or fails on the easy_vqa probe)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "partial output of $1 $2"\ncase "$*" in *easy_vqa*) exit 1 ;; esac\nsleep 30\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    limits = dict(ENV_TIMEOUT="1", KERNEL_TIMEOUT="1", TRAIN_TIMEOUT="1", REPORT_TIMEOUT="1")
    env = _script_env(tmp_path / "results", PYTHON=str(fake), OUT=str(out), **limits, **extra)
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    return done, out


def test_gpu_check_steps_cut_at_their_limit_still_publish(tmp_path):
    """A step stopped at its limit leaves what it printed in $OUT, and the later steps still run."""
    started = time.monotonic()
    done, out = _fake_python_run(tmp_path)
    assert done.returncode == 1 and time.monotonic() - started < 60
    log = (out / "gpu_check.log").read_text()
    for name in ("environment", "kernels", "train", "report"):
        assert f"step {name}: TIMED OUT" in log
    assert "FAILED steps: environment kernels train report" in log
    assert (out / "steps.log").read_text().count("partial output of") >= 4
    assert "results.tar.gz" in _check_published(out)


def test_gpu_check_publishes_within_the_file_count_cap(tmp_path):
    """GPU_CHECK_MAX_FILES keeps the first files of the published list; later ones are left out."""
    done, out = _fake_python_run(tmp_path, GPU_CHECK_MAX_FILES="2")
    assert done.returncode == 1
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "steps.log"}
    assert "FAILED steps: environment kernels train report" in (out / "gpu_check.log").read_text()


def test_gpu_check_with_no_time_left_skips_steps(tmp_path):
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"],
        env=_script_env(tmp_path, PYTHON="false", GPU_CHECK_BUDGET="15"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "step environment: NO TIME LEFT (budget 15s)" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_exit_status_reflects_failed_steps(tmp_path):
    done = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"],
        env=_script_env(tmp_path, PYTHON="false"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    log = (tmp_path / "gpu_check.log").read_text()
    assert "FAILED steps: environment kernels train report" in log


def test_pytest_benchmark_entry_point_groups_providers_side_by_side(tmp_path):
    """`python -m pytest bench/ --benchmark-only` at the tiny sizes: one group per op and shape holding
    every provider (the plumbing; no timing is asserted)."""
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench/",
            "--benchmark-only",
            "--bench-sizes",
            "tiny",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={report}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    groups = {}
    for entry in json.loads(report.read_text())["benchmarks"]:
        groups.setdefault(entry["group"], set()).add(entry["extra_info"]["provider"])
        assert entry["stats"]["rounds"] == 3
    assert groups == {
        "fused_linear_calibrl_loss N 8, D 16, V 96 float32 full": {
            "calibrl",
            "eager",
            "compiled",
            "compiled-calibrl",
            "liger",
        },
        "fused_calibrl_loss N 8, V 96 float32 full": {"calibrl", "eager", "compiled", "compiled-calibrl"},
        "token_logprobs N 8, V 96 float32 full": {"calibrl", "eager", "compiled", "compiled-calibrl"},
    }
