"""The benchmarks run (tiny configurations), write well-formed long-format CSV, plot, and tabulate.

No timing assertions: only that every entry point executes, that rows have the exact columns and
sane values, that providers are discovered through calibrl_kernels._dispatch, that failures are
recorded instead of raised, and that the README table's verdicts are computed correctly.
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
import types
from pathlib import Path

import pytest
import torch

from bench import bench_train, harness, plot, readme_table, run, suites
from bench.harness import CSV_COLUMNS, MIB, TimingConfig
from bench.providers import Provider, calibrl_providers, forced_impl
from bench.workloads import WORKLOADS, Point
from calibrl_kernels import _dispatch, reference

REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def events(path: Path):
    with open(path.with_name(path.stem + ".events.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_well_formed(path: Path):
    header, rows = read_csv(path)
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
    assert len({row["timestamp"] for row in rows}) >= 1
    return rows


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """The tiny suite (every kernel, compiled off), run once in this process."""
    out = tmp_path_factory.mktemp("bench_tiny")
    run.run_suite(suites.TINY, CPU, out, run.RunOptions(mem_cap_bytes=2 * 2**30), train=False)
    return out


def test_tiny_suite_writes_every_kernel_and_provider(tiny_results):
    rows = check_well_formed(tiny_results / "kernels.csv")
    kernels = {row["kernel"] for row in rows}
    assert set(WORKLOADS) | {"gemm", "copy"} <= kernels
    for kernel, workload in WORKLOADS.items():
        at = [row for row in rows if row["kernel"] == kernel]
        providers = {row["provider"] for row in at}
        assert {"calibrl", "eager", "roofline"} <= providers, kernel
        for row in at:
            if row["provider"] in ("calibrl", "eager"):
                assert math.isfinite(float(row["p50"])), row
                assert float(row["p50"]) >= 0
                assert row["unit"] == ("ms" if row["metric"] == "speed" else "MiB")
            if row["provider"] == "roofline" and row["metric"] == "speed":
                assert float(row["p50"]) > 0
        modes = {row["mode"] for row in at if row["provider"] == "calibrl"}
        assert modes == ({"forward", "full"} if workload.differentiable else {"forward"})
    linear = [row for row in rows if row["kernel"] == "fused_linear_calibrl_loss" and row["provider"] == "liger"]
    assert linear and all(math.isfinite(float(row["p50"])) for row in linear)  # Liger's GRPO loss runs on CPU
    floors = {row["kernel"]: row for row in rows if row["kernel"] in ("gemm", "copy")}
    assert floors["gemm"]["unit"] == "TFLOP/s" and float(floors["gemm"]["p50"]) > 0
    assert floors["copy"]["unit"] == "GB/s" and float(floors["copy"]["p50"]) > 0
    kinds = {event["kind"] for event in events(tiny_results / "kernels.csv")}
    assert {"rates", "info", "skipped"} <= kinds  # liger has no logits kernel on CPU: skipped, with a reason


def test_tiny_suite_renders_plots_and_table(tiny_results):
    for kernel in WORKLOADS:
        pngs = list(tiny_results.glob(f"{kernel}__*.png"))
        assert pngs, kernel
        assert pngs[0].read_bytes()[:8] == PNG_MAGIC
    table = (tiny_results / "readme_table.md").read_text()
    assert "Targets" in table and "cpu-" in table


def test_calibrl_providers_follow_dispatch(monkeypatch):
    """A backend that _dispatch can load becomes a provider with no change to bench/, forced via CALIBRL_IMPL."""
    calls = []

    def fake_token_logprobs(*args):
        calls.append(os.environ.get("CALIBRL_IMPL"))
        return reference.token_logprobs(*args)

    fake = types.SimpleNamespace(OPS={"token_logprobs": fake_token_logprobs}, availability=lambda device: (True, ""))
    monkeypatch.setitem(_dispatch._loaded, "cpp", fake)  # as if calibrl_kernels.cpu had landed
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    providers, skipped = calibrl_providers("token_logprobs", CPU)
    assert [(p.name, p.impl, p.resolved) for p in providers] == [("calibrl", None, "cpp"), ("calibrl-torch", "torch", "torch")]
    providers_all, _ = calibrl_providers("token_logprobs", CPU, all_impls=True)
    assert [p.name for p in providers_all] == ["calibrl", "calibrl-cpp", "calibrl-torch"]
    # an op the new backend does not implement: the default falls back, the forced provider is left out
    group_providers, group_skipped = calibrl_providers("group_advantages", CPU)
    assert [(p.name, p.resolved) for p in group_providers] == [("calibrl", "torch")]
    assert any(name == "calibrl-cpp" and "does not implement" in why for name, why in group_skipped)

    workload = WORKLOADS["token_logprobs"]
    torch.manual_seed(0)
    inputs = workload.build(Point("token_logprobs", "N", (("N", 4), ("V", 11))), CPU)
    timing = TimingConfig(warmup=1, min_reps=1, max_reps=1, min_time_s=0.0)
    assert run.measure(workload, providers[0], "full", inputs, CPU, timing).status == "ok"
    assert calls and set(calls) == {None}  # the default provider runs with CALIBRL_IMPL unset
    calls.clear()
    assert run.measure(workload, Provider("calibrl-cpp", "cpp", "cpp"), "forward", inputs, CPU, timing).status == "ok"
    assert calls and set(calls) == {"cpp"}
    assert "CALIBRL_IMPL" not in os.environ


def test_forced_impl_restores_the_environment(monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", "torch")
    with forced_impl(None):
        assert "CALIBRL_IMPL" not in os.environ
    assert os.environ["CALIBRL_IMPL"] == "torch"
    with forced_impl("cpp"):
        assert os.environ["CALIBRL_IMPL"] == "cpp"
    assert os.environ["CALIBRL_IMPL"] == "torch"


def test_providers_compute_the_same_loss():
    """calibrl, eager and compiled's source function agree, so the comparison is like with like."""
    for kernel, dims in (("fused_calibrl_loss", (("N", 16), ("V", 37))),
                         ("fused_linear_calibrl_loss", (("N", 16), ("D", 8), ("V", 37))),
                         ("token_logprobs", (("N", 6), ("V", 37)))):
        workload = WORKLOADS[kernel]
        torch.manual_seed(0)
        inputs = workload.build(Point(kernel, "N", dims), CPU)
        ours = workload.calibrl(inputs)()
        eager = workload.eager(inputs)()
        assert float(ours) != 0.0  # the batch has non-zero advantages: the comparison means something
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Liger's Triton kernels under the interpreter")
def test_liger_logits_providers_run_under_the_triton_interpreter():
    """The GPU-only Liger calls (cross-entropy, GRPO loss on logits) have the right signatures: checked
    on CPU tensors through Triton's interpreter, as if on CUDA."""
    for kernel, dims in (("token_logprobs", (("N", 8), ("V", 37))), ("fused_calibrl_loss", (("N", 16), ("V", 37)))):
        workload = WORKLOADS[kernel]
        torch.manual_seed(0)
        inputs = workload.build(Point(kernel, "N", dims), CPU)
        with pytest.raises(Exception, match="CUDA"):
            workload.liger(inputs, CPU)
        forward, grad_tensors = workload.liger(inputs, torch.device("cuda"))
        loss = forward()
        (grad,) = torch.autograd.grad(loss, grad_tensors)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad_tensors[0] is not inputs["logits"]  # Liger gets its own copy (it writes into its input)
        if kernel == "token_logprobs":  # -sum(nll) of Liger's cross-entropy is our sum of log-probs
            ours = torch.log_softmax(inputs["logits"].float(), -1).gather(-1, inputs["targets"][:, None]).sum()
            torch.testing.assert_close(loss.float(), ours, rtol=1e-5, atol=1e-5)


def test_failed_provider_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "failed"
    run.run_suite(suites.TINY, CPU, out, run.RunOptions(compiled=True, providers=["compiled", "eager"]),
                  kernels=["group_advantages"], train=False, plot=False, table=False)
    rows = check_well_formed(out / "kernels.csv")
    compiled = [row for row in rows if row["provider"] == "compiled"]
    assert compiled and all(math.isnan(float(row["p50"])) for row in compiled)
    assert all(math.isfinite(float(row["p50"])) for row in rows if row["provider"] == "eager")
    failures = [e for e in events(out / "kernels.csv") if e["kind"] == "failed" and e["provider"] == "compiled"]
    assert failures and "inductor exploded" in failures[0]["reason"]


def test_memory_guard_does_not_run_providers_that_materialise_logits(tmp_path):
    out = tmp_path / "guard"
    run.run_suite(suites.TINY, CPU, out, run.RunOptions(mem_cap_bytes=1.0, providers=["calibrl-torch", "eager"]),
                  kernels=["fused_calibrl_loss"], train=False, plot=False, table=False)
    rows = check_well_formed(out / "kernels.csv")
    guarded = [row for row in rows if row["provider"] in ("calibrl-torch", "eager")]
    assert guarded and all(math.isnan(float(row["p50"])) for row in guarded)  # torch reference and eager both materialise
    reasons = [e["reason"] for e in events(out / "kernels.csv") if e["kind"] == "not-run"]
    assert reasons and all("exceeds the memory cap" in why for why in reasons)


def test_isolated_measurement_runs_in_a_child_and_is_killed_above_the_cap():
    point = Point("group_advantages", "B", (("B", 8), ("G", 4)))
    timing = TimingConfig(warmup=1, min_reps=1, max_reps=1, min_time_s=0.0)
    ok = run.measure_isolated(point, Provider("eager"), "forward", CPU, timing, cap_bytes=8 * 2**30, timeout_s=120)
    assert ok.status == "ok" and len(ok.times_s) == 1 and len(ok.memory_bytes) == 1
    killed = run.measure_isolated(point, Provider("eager"), "forward", CPU, timing, cap_bytes=1.0, timeout_s=120)
    assert killed.status == "failed" and "memory cap" in killed.reason


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_provider_runs(tmp_path):
    """The one real torch.compile of the suite (slow on a CPU: tens of seconds when the cache is cold)."""
    out = tmp_path / "compiled"
    one_point = dataclasses.replace(suites.TINY, sweeps=(suites.Sweep("token_logprobs", "N", (8,), (("V", 96),)),))
    run.run_suite(one_point, CPU, out, run.RunOptions(compiled=True, providers=["compiled"]),
                  train=False, plot=False, table=False)
    rows = check_well_formed(out / "kernels.csv")
    compiled = [row for row in rows if row["provider"] == "compiled"]
    assert compiled and all(math.isfinite(float(row["p50"])) for row in compiled), events(out / "kernels.csv")


def test_train_step_providers_compute_the_same_loss():
    config = bench_train.CONFIGS["tiny"]
    losses = {}
    for name in ("calibrl", "calibrl-logits", "eager"):
        model = bench_train.build_model(config, CPU, config.prompt + config.responses[0])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = bench_train.synthetic_batch(config, config.responses[0], CPU)
        losses[name] = bench_train.make_step(Provider(name), model, optimizer, batch, config.prompt)()
    assert float(losses["eager"]) != 0.0
    torch.testing.assert_close(losses["calibrl"], losses["eager"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["calibrl-logits"], losses["eager"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# README table: verdicts from a hand-made CSV at the targets' shapes
# --------------------------------------------------------------------------------------------
def write_rows(path: Path, rows, events_=()):
    writer = harness.ResultWriter(path, CPU, timestamp="2026-01-01T00:00:00+00:00", version="test")
    for kernel, provider, mode, metric, x_name, x, value in rows:
        writer.row(kernel, provider, mode, metric, "ms" if metric == "speed" else "MiB", x_name, x, [value] * 3)
    for event in events_:
        writer.event(**event)


def test_readme_table_computes_met_and_missed(tmp_path):
    linear = readme_table.CPU_LINEAR.point
    qwen = readme_table.CPU_QWEN_HEAD.point
    grads = WORKLOADS["fused_linear_calibrl_loss"].gradient_bytes(linear) / MIB  # 66.5 MiB
    kernel = "fused_linear_calibrl_loss"
    rows = [
        (kernel, "roofline", "full", "speed", linear.x_name, 2048, 1000.0),
        (kernel, "calibrl", "full", "speed", linear.x_name, 2048, 1300.0),
        (kernel, "eager", "full", "speed", linear.x_name, 2048, 1100.0),
        (kernel, "liger", "full", "speed", linear.x_name, 2048, 1500.0),
        (kernel, "calibrl", "full", "memory", linear.x_name, 2048, grads + 30.0),
        (kernel, "eager", "full", "memory", linear.x_name, 2048, 1300.0),
        (kernel, "calibrl-cpp", "full", "speed", linear.x_name, 2048, 1100.0),
        (kernel, "calibrl-cpp", "full", "memory", linear.x_name, 2048, grads + 100.0),
        (kernel, "calibrl", "full", "memory", qwen.x_name, 8192, 900.0),
        (kernel, "calibrl", "full", "speed", qwen.x_name, 8192, 30000.0),
        (kernel, "eager", "full", "memory", qwen.x_name, 8192, math.nan),
        (kernel, "eager", "full", "speed", qwen.x_name, 8192, math.nan),
    ]
    write_rows(tmp_path / "kernels.csv", rows, [
        {"kind": "info", "kernel": kernel, "provider": "calibrl", "impl": "torch"},
        {"kind": "not-run", "kernel": kernel, "provider": "eager", "mode": "full", "x": 8192,
         "reason": "not run: estimated peak 28.7 GiB exceeds the memory cap 4.0 GiB"},
    ])
    table = readme_table.render(tmp_path, "cpu")
    calibrl_line = next(line for line in table.splitlines() if line.startswith("| calibrl (default: torch)"))
    assert "1.30x: missed by 0.15x (13%)" in calibrl_line  # 1300 / 1000 against <= 1.15x
    assert "1.18x: missed by 0.18x (18%)" in calibrl_line  # 1300 / 1100 against < 1
    assert "0.87x: met" in calibrl_line  # 1300 / 1500
    assert "30 MiB: met" in calibrl_line  # peak minus the gradients, against 64 MiB
    cpp_line = next(line for line in table.splitlines() if line.startswith("| calibrl-cpp"))
    assert "100 MiB: missed by 36 MiB" in cpp_line
    assert "not measured (not run: estimated peak 28.7 GiB" in table  # the Qwen-size eager, with its reason
    assert "- calibrl (default: torch): 900 MiB" in table


def test_readme_table_gpu_targets_at_least(tmp_path):
    linear, logits = readme_table.GPU_LINEAR.point, readme_table.GPU_LOGITS.point
    rows = [
        ("fused_linear_calibrl_loss", "roofline", "full", "speed", linear.x_name, 16384, 76.0),
        ("fused_linear_calibrl_loss", "calibrl", "full", "speed", linear.x_name, 16384, 100.0),
        ("fused_linear_calibrl_loss", "liger", "full", "speed", linear.x_name, 16384, 160.0),
        ("fused_calibrl_loss", "roofline", "full", "speed", logits.x_name, 16384, 8.0),
        ("fused_calibrl_loss", "calibrl", "full", "speed", logits.x_name, 16384, 10.0),
    ]
    write_rows(tmp_path / "kernels.csv", rows)
    line = next(l for l in readme_table.render(tmp_path, "gpu").splitlines() if l.startswith("| calibrl"))
    assert "1.32x: met" in line  # 100 / 76 <= 1.4
    assert "1.60x: met" in line  # Liger 160 / 100 >= 1.5
    assert "0.80x: missed by 0.05x (6%)" in line  # floor 8 / 10 against >= 0.85
    assert "not measured" in line  # Liger's memory, eager, compiled: no rows


def test_plot_cli_renders_png_with_roofline(tmp_path):
    point = readme_table.CPU_LINEAR.point
    rows = [("fused_linear_calibrl_loss", provider, mode, "speed", point.x_name, n, value * n)
            for provider, value in (("calibrl", 1.0), ("eager", 1.2), ("roofline", 0.7))
            for mode in ("forward", "full") for n in (512, 1024, 2048)]
    rows += [("fused_linear_calibrl_loss", "calibrl", "full", "memory", point.x_name, n, 70.0) for n in (512, 1024, 2048)]
    write_rows(tmp_path / "kernels.csv", rows)
    assert plot.main([str(tmp_path / "kernels.csv"), "--out", str(tmp_path / "png")]) == 0
    pngs = list((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == PNG_MAGIC


def test_csv_writer_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="expected the header"):
        harness.ResultWriter(path, CPU)
    with pytest.raises(ValueError, match="metric"):
        harness.ResultWriter(tmp_path / "ok.csv", CPU).row("k", "p", "full", "latency", "ms", "N", 1, [1, 2, 3])


def test_sweep_points_have_stable_names():
    sweep = suites.Sweep("fused_linear_calibrl_loss", "N", (8, 16), (("V", 96), ("D", 16)))
    points = list(sweep.points())
    assert [p.x for p in points] == [8, 16]
    assert points[0].x_name == "N; D=16; V=96; dtype=float32"
    assert harness.parse_x_name(points[0].x_name) == ("N", {"D": "16", "V": "96", "dtype": "float32"})
    assert Point.from_dict(points[1].to_dict()) == points[1]
    for suite in suites.SUITES.values():  # every configured size is a valid batch shape
        for s in suite.sweeps:
            for p in s.points():
                if "N" in p.d:
                    from bench.workloads import split_tokens
                    split_tokens(p.d["N"], WORKLOADS[p.kernel].max_tokens_per_row)


# --------------------------------------------------------------------------------------------
# gpu_check.sh
# --------------------------------------------------------------------------------------------
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
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=_script_env(results, OUT=str(out)),
                          capture_output=True, text=True, timeout=300)
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
        assert "published" in log[ended:].splitlines()[1], log[ended:ended + 300]
    assert "every step passed" in log
    check_well_formed(results / "kernels.csv")
    train_rows = check_well_formed(results / "train.csv")
    assert {row["provider"] for row in train_rows} >= {"calibrl", "calibrl-logits", "eager"}
    assert all(math.isfinite(float(row["p50"])) for row in train_rows)
    assert any(p.read_bytes()[:8] == PNG_MAGIC for p in results.glob("train_step__*.png"))
    assert (results / "readme_table.md").read_text().startswith("Measured on")
    published = _check_published(out)
    assert published >= {"gpu_check.log", "steps.log", "kernels.csv", "train.csv", "readme_table.md", "results.tar.gz"}
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


def test_gpu_check_steps_cut_at_their_limit_still_publish(tmp_path):
    """A step stopped at its limit leaves what it printed in $OUT, and the later steps still run."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "partial output of $1 $2"\ncase "$*" in *easy_vqa*) exit 1 ;; esac\nsleep 30\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    results = tmp_path / "results"
    limits = dict(ENV_TIMEOUT="1", KERNEL_TIMEOUT="1", TRAIN_TIMEOUT="1", REPORT_TIMEOUT="1")
    started = time.monotonic()
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=_script_env(results, PYTHON=str(fake), OUT=str(out),
                          **limits), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60
    log = (out / "gpu_check.log").read_text()
    for name in ("environment", "kernels", "train", "report"):
        assert f"step {name}: TIMED OUT" in log
    assert "FAILED steps: environment kernels train report" in log
    assert (out / "steps.log").read_text().count("partial output of") >= 4
    _check_published(out)


def test_gpu_check_with_no_time_left_skips_steps(tmp_path):
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=_script_env(tmp_path, PYTHON="false",
                          GPU_CHECK_BUDGET="15"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "step environment: NO TIME LEFT (budget 15s)" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_exit_status_reflects_failed_steps(tmp_path):
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=_script_env(tmp_path, PYTHON="false"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    log = (tmp_path / "gpu_check.log").read_text()
    assert "FAILED steps: environment kernels train report" in log


def test_pytest_benchmark_entry_point_groups_providers_side_by_side(tmp_path):
    """`python -m pytest bench/ --benchmark-only` at the tiny sizes: one group per kernel and shape holding
    every provider, each with its floor in extra_info (the plumbing; no timing is asserted)."""
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "--bench-sizes", "tiny", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={report}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    groups = {}
    for entry in json.loads(report.read_text())["benchmarks"]:
        groups.setdefault(entry["group"], set()).add(entry["extra_info"]["provider"])
        assert entry["extra_info"]["floor_s"] > 0 and entry["stats"]["rounds"] == 3
    assert groups == {
        "fused_linear_calibrl_loss N 16, D 16, V 96 fp32 forward+backward": {"calibrl", "eager", "compiled", "liger"},
        "fused_calibrl_loss N 16, V 96 fp32 forward+backward": {"calibrl", "eager", "compiled"},
        "token_logprobs N 16, V 96 fp32 forward+backward": {"calibrl", "eager", "compiled"},
    }


def test_sweep_table_rows_per_x_with_floor_and_calibrl_ratios(tmp_path):
    kernel, name = "fused_linear_calibrl_loss", "V; N=1024; D=896; dtype=float32"
    rows = []
    for v, (floor, mine, eager) in {8000: (100.0, 110.0, 130.0), 32000: (400.0, 420.0, 600.0)}.items():
        rows += [(kernel, "roofline", "full", "speed", name, v, floor), (kernel, "calibrl", "full", "speed", name, v, mine),
                 (kernel, "eager", "full", "speed", name, v, eager)]
    rows.append((kernel, "calibrl", "full", "memory", name, 8000, 50.0))  # memory rows are not in the table
    write_rows(tmp_path / "kernels.csv", rows)
    lines = readme_table.sweep_table(tmp_path).splitlines()
    assert lines[2] == "| V | calibrl ms (x floor, / calibrl) | eager ms (x floor, / calibrl) |"
    assert lines[4] == "| 8000 | 110 (1.10x, 1.00) | 130 (1.30x, 1.18) |"
    assert lines[5] == "| 32000 | 420 (1.05x, 1.00) | 600 (1.50x, 1.43) |"
