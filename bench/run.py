"""Run a benchmark suite: every kernel x size x provider x mode, side by side in one process.

    python -m bench.run --suite readme-cpu          # the README's CPU table (CSV + PNG + readme_table.md)
    python -m bench.run --suite gpu                 # Qwen-scale bf16 shapes, targets' points first
    python -m bench.run --suite gpu-targets         # only the targets' points (gpu_check.sh, then gpu-sweeps)
    python -m bench.run --suite tiny --out /tmp/b   # seconds; what the tests run

Writes ``kernels.csv`` (+ ``kernels.events.jsonl``: why a provider was skipped or failed, which
backend ``calibrl`` resolved to) in ``bench/results/<device>/`` or ``--out``; the train-step
benchmark writes ``train.csv`` beside it; then PNGs (``bench.plot``) and, for suites with targets,
``readme_table.md`` (``bench.readme_table``).

A provider that raises (a compile failure, out of memory, a backend error) is recorded as failed
with NaN values and the run goes on. Providers that materialise fp32 logits are skipped where their
estimated peak exceeds the memory cap; sweeps marked ``isolate`` run each provider in a child
process that is killed if its resident set exceeds the cap.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import harness
from .harness import MIB, ResultWriter, TimingConfig, percentiles
from .providers import (
    CALIBRL, COMPILED, EAGER, LIGER, ROOFLINE, Provider, calibrl_providers, forced_impl, liger_available,
    provider_from_name,
)
from .suites import SUITES, Suite, Sweep
from .workloads import WORKLOADS, FusedLinearCalibrlLoss, Point, Rates, Unavailable, Workload

CHILD_RESULT_TAG = "BENCH_RESULT "


@dataclasses.dataclass
class Outcome:
    status: str  # "ok"; "skipped" (does not apply: no rows); "not-run" (memory guard) or "failed": NaN rows
    times_s: List[float] = dataclasses.field(default_factory=list)
    memory_bytes: List[float] = dataclasses.field(default_factory=list)
    reason: str = ""


def _configure_compile() -> None:
    """Static shapes, one compiled graph per size, never a silent fallback to eager at a recompile limit."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))


def make_call(workload: Workload, provider: Provider, inputs: Dict[str, torch.Tensor], device: torch.device):
    """(forward callable, tensors the full mode differentiates) of one provider."""
    if provider.is_calibrl:
        return workload.calibrl(inputs), workload.grad_inputs(inputs)
    if provider.name == EAGER:
        return workload.eager(inputs), workload.grad_inputs(inputs)
    if provider.name == COMPILED:
        _configure_compile()
        return workload.compiled(inputs), workload.grad_inputs(inputs)
    if provider.name == LIGER:
        if type(workload).liger is Workload.liger:
            workload.liger(inputs, device)  # raises Unavailable with the reason, without importing Liger
        ok, reason = liger_available()
        if not ok:
            raise Unavailable(reason)
        return workload.liger(inputs, device)
    raise ValueError(f"provider: unknown {provider.name!r}")


def _as_outcome(error: BaseException) -> Outcome:
    if isinstance(error, Unavailable):
        return Outcome("skipped", reason=str(error))
    if isinstance(error, torch.OutOfMemoryError):
        return Outcome("failed", reason=f"out of memory: {str(error).splitlines()[0]}")
    message = " ".join(str(error).split())[:400]
    return Outcome("failed", reason=f"{type(error).__name__}: {message}")


def _impl_context(provider: Provider):
    return forced_impl(provider.impl) if provider.is_calibrl else contextlib.nullcontext()


def measure_many(
    workload: Workload, providers: Sequence[Provider], mode: str, inputs: Dict[str, torch.Tensor], device: torch.device,
    timing: TimingConfig, probe: Optional[Callable[[], object]] = None, probe_times: Optional[List[float]] = None,
) -> Dict[str, Outcome]:
    """Every provider in one mode: warm-up and peak memory each, then timed calls interleaved round by
    round (one call of each provider per round), so that a load change on a shared machine hits all
    providers alike and their ratios stay meaningful. A provider that raises is recorded and dropped.

    ``probe`` (the roofline's GEMM or copy) is timed once per round too, into ``probe_times``, so the
    floor is measured under the same conditions as the providers."""
    outcomes: Dict[str, Outcome] = {}
    calls: Dict[str, Tuple[Provider, Callable[[], object]]] = {}
    for provider in providers:
        try:
            with _impl_context(provider):
                forward, grad_tensors = make_call(workload, provider, inputs, device)
                if mode == "full":
                    def call(forward=forward, grad_tensors=grad_tensors):
                        return torch.autograd.grad(forward(), grad_tensors)
                else:
                    call = forward
                for _ in range(timing.warmup):
                    result = call()
                    harness.synchronize(device)
                    del result
                memory = [harness.peak_memory_bytes(call, device) for _ in range(timing.memory_reps)]
            outcomes[provider.name] = Outcome("ok", [], memory)
            calls[provider.name] = (provider, call)
        except Exception as error:  # a compile failure, out of memory, a backend error: record it and go on
            outcomes[provider.name] = _as_outcome(error)
            _release(device)
    if probe is not None:
        probe()  # warm-up
    started, rounds = time.perf_counter(), 0
    while calls and rounds < timing.max_reps and (
        rounds < timing.min_reps or time.perf_counter() - started < timing.min_time_s * len(calls)
    ):
        if probe is not None:
            harness.synchronize(device)
            t0 = time.perf_counter()
            probe()
            harness.synchronize(device)
            probe_times.append(time.perf_counter() - t0)
        for name, (provider, call) in list(calls.items()):
            try:
                with _impl_context(provider):
                    harness.synchronize(device)
                    t0 = time.perf_counter()
                    result = call()
                    harness.synchronize(device)
                    outcomes[name].times_s.append(time.perf_counter() - t0)
                    del result
            except Exception as error:
                outcomes[name] = _as_outcome(error)
                del calls[name]
                _release(device)
        rounds += 1
    calls.clear()
    _release(device)
    return outcomes


def measure(
    workload: Workload, provider: Provider, mode: str, inputs: Dict[str, torch.Tensor], device: torch.device,
    timing: TimingConfig,
) -> Outcome:
    """Warm up, then peak memory, then timed calls of one provider in one mode."""
    return measure_many(workload, [provider], mode, inputs, device, timing)[provider.name]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def estimated_bytes(workload: Workload, point: Point, provider: Provider, mode: str) -> float:
    """Rough peak of a provider, for the guard: only what is known to materialise (N, V) logits."""
    if provider.name in (EAGER, COMPILED) or (provider.is_calibrl and provider.resolved == "torch"):
        return workload.materialized_bytes(point, mode)
    if provider.name == LIGER:
        return workload.liger_bytes(point, mode)
    return 0.0  # a fused backend: unknown but small; the cap of an isolated run still guards it


# --------------------------------------------------------------------------------------------
# Isolated measurements (a child process per provider, killed above the memory cap)
# --------------------------------------------------------------------------------------------
def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    harness.prepare_host_memory()
    point = Point.from_dict(spec["point"])
    workload = WORKLOADS[point.kernel]
    provider = provider_from_name(spec["provider"], workload.op, device)
    torch.manual_seed(0)
    inputs = workload.build(point, device)
    outcome = measure(workload, provider, spec["mode"], inputs, device, TimingConfig(**spec["timing"]))
    print(CHILD_RESULT_TAG + json.dumps(dataclasses.asdict(outcome)), flush=True)
    return 0


def measure_isolated(
    point: Point, provider: Provider, mode: str, device: torch.device, timing: TimingConfig, cap_bytes: float,
    timeout_s: float,
) -> Outcome:
    spec = {"point": point.to_dict(), "provider": provider.name, "mode": mode, "device": str(device),
            "timing": timing.to_dict(), "threads": torch.get_num_threads()}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(harness.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryFile(mode="w+") as stdout:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.run", "--child", json.dumps(spec)], cwd=harness.REPO_ROOT, env=env,
            stdout=stdout, stderr=None,
        )
        started, peak_rss, killed = time.monotonic(), 0, ""
        while child.poll() is None:
            rss = harness.process_rss_bytes(child.pid)
            peak_rss = max(peak_rss, rss)
            if rss > cap_bytes:
                killed = f"exceeded the memory cap of {cap_bytes / 2**30:.1f} GiB (resident set {rss / 2**30:.1f} GiB)"
            elif time.monotonic() - started > timeout_s:
                killed = f"exceeded the time limit of {timeout_s:.0f} s"
            if killed:
                child.kill()
                child.wait()
                return Outcome("failed", reason=killed)
            time.sleep(0.05)
        stdout.seek(0)
        for line in stdout.read().splitlines():
            if line.startswith(CHILD_RESULT_TAG):
                return Outcome(**json.loads(line[len(CHILD_RESULT_TAG):]))
    return Outcome("failed", reason=f"child process exited with status {child.returncode} without a result")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunOptions:
    providers: Optional[Sequence[str]] = None  # keep only these (calibrl-* names, eager, compiled, liger)
    modes: Optional[Sequence[str]] = None
    compiled: Optional[bool] = None  # None: the suite's default
    all_impls: bool = False
    allow_interpreter: bool = False
    mem_cap_bytes: float = math.inf
    child_timeout_s: float = 1800.0
    liger_compiled: Optional[bool] = None
    threads: Optional[int] = None  # torch intra-op threads (None: the suite's setting, else every core)
    skip_isolated: bool = False  # leave out the sweeps marked isolate (the Qwen-size head: minutes on a CPU)


def measure_rates(suite: Suite, device: torch.device, writer: ResultWriter, dtypes: Sequence[str]) -> Rates:
    """The GEMM rate of every dtype the suite uses and the copy bandwidth, written as rows too."""
    from .workloads import DTYPES

    rates = Rates()
    config = TimingConfig(warmup=2, min_reps=5, max_reps=20, min_time_s=0.5 if suite.gemm_size > 256 else 0.0)
    for dtype in sorted(set(dtypes)):
        seconds = harness.gemm_seconds(device, DTYPES[dtype], suite.gemm_size, config)
        per_rep = [2.0 * suite.gemm_size ** 3 / s for s in seconds]
        rates.gemm_flops[dtype] = percentiles(per_rep)[1]
        writer.row("gemm", "torch.mm", "forward", "speed", "TFLOP/s", harness.x_name("S", dtype=dtype), suite.gemm_size,
                   [v / 1e12 for v in percentiles(per_rep)])
    seconds = harness.copy_seconds(device, suite.copy_bytes, config)
    per_rep = [2.0 * suite.copy_bytes / s for s in seconds]
    rates.copy_bytes_per_s = percentiles(per_rep)[1]
    writer.row("copy", "torch.copy_", "forward", "speed", "GB/s", "bytes; counted=read+write", suite.copy_bytes,
               [v / 1e9 for v in percentiles(per_rep)])
    return rates


def _providers_for(workload: Workload, sweep: Sweep, point: Point, device: torch.device, options: RunOptions,
                   suite: Suite, writer: ResultWriter) -> List[Provider]:
    providers, skipped = calibrl_providers(
        workload.op, device, all_impls=options.all_impls, allow_interpreter=options.allow_interpreter,
        exclude=suite.impls_excluded,
    )
    for name, reason in skipped:
        writer.event(kind="skipped", kernel=workload.name, provider=name, x_name=point.x_name, x=point.x, reason=reason)
    for provider in providers:
        writer.event(kind="info", kernel=workload.name, provider=provider.name, x_name=point.x_name, x=point.x,
                     impl=provider.resolved)
    compiled = suite.compiled_default if options.compiled is None else options.compiled
    baselines = [EAGER] + ([COMPILED] if compiled and sweep.compiled_enabled(point.x) else []) + [LIGER]
    providers += [Provider(name) for name in baselines]
    if options.providers:
        wanted = set(options.providers)
        providers = [p for p in providers if p.name in wanted or (CALIBRL in wanted and p.is_calibrl)]
    return providers


def _write_outcome(writer: ResultWriter, point: Point, provider: Provider, mode: str, outcome: Outcome) -> None:
    kernel = point.kernel
    if outcome.status != "ok":
        writer.event(kind=outcome.status, kernel=kernel, provider=provider.name, mode=mode, x_name=point.x_name,
                     x=point.x, reason=outcome.reason)
        print(f"  {provider.name:16s} {mode:7s} {outcome.status}: {outcome.reason}", flush=True)
        if outcome.status == "skipped":
            return  # not applicable here: no rows
    speed = percentiles([t * 1e3 for t in outcome.times_s])
    memory = percentiles([b / MIB for b in outcome.memory_bytes])
    writer.row(kernel, provider.name, mode, "speed", "ms", point.x_name, point.x, speed)
    writer.row(kernel, provider.name, mode, "memory", "MiB", point.x_name, point.x, memory)
    if outcome.status == "ok":
        print(f"  {provider.name:16s} {mode:7s} p50 {speed[1]:10.3f} ms   peak +{memory[1]:9.1f} MiB", flush=True)


def _floor_probe(workload: Workload, point: Point, suite: Suite, device: torch.device) -> Callable[[], object]:
    if workload.floor_kind == "gemm":
        return harness.gemm_call(device, point.torch_dtype, suite.gemm_size)
    return harness.copy_call(device, suite.copy_bytes)


def _point_rates(workload: Workload, point: Point, suite: Suite, rates: Rates, probe_times: List[float]) -> Rates:
    """The run's rates, with the one this point's roofline uses re-measured during its rounds (if it was)."""
    if not probe_times:
        return rates
    seconds = percentiles(probe_times)[1]
    if workload.floor_kind == "gemm":
        return dataclasses.replace(rates, gemm_flops=dict(rates.gemm_flops, **{point.dtype: 2.0 * suite.gemm_size ** 3 / seconds}))
    return dataclasses.replace(rates, copy_bytes_per_s=2.0 * suite.copy_bytes / seconds)


def _write_roofline(writer: ResultWriter, workload: Workload, point: Point, mode: str, rates: Rates) -> None:
    floor = workload.roofline_seconds(point, mode, rates)
    writer.row(point.kernel, ROOFLINE, mode, "speed", "ms", point.x_name, point.x, [floor * 1e3] * 3)
    if mode == "full" and workload.gradient_bytes(point) > 0:
        writer.row(point.kernel, ROOFLINE, mode, "memory", "MiB", point.x_name, point.x,
                   [workload.gradient_bytes(point) / MIB] * 3)


def run_point(workload: Workload, sweep: Sweep, point: Point, suite: Suite, device: torch.device, rates: Rates,
              writer: ResultWriter, options: RunOptions) -> None:
    timing = sweep.timing or suite.timing
    modes = [m for m in sweep.modes if (m == "forward" or workload.differentiable)]
    if options.modes:
        modes = [m for m in modes if m in options.modes]
    if not modes:
        return
    print(f"{point.kernel}  {point.x_name}  {point.axis}={point.x}", flush=True)
    providers = _providers_for(workload, sweep, point, device, options, suite, writer)
    cap = min(options.mem_cap_bytes, harness.free_device_memory_bytes(device) * 0.9)
    inputs = None
    for mode in modes:
        in_process: List[Provider] = []
        outcomes: Dict[str, Outcome] = {}
        for provider in providers:
            estimate = estimated_bytes(workload, point, provider, mode)
            if estimate > cap:
                outcomes[provider.name] = Outcome("not-run", reason=(
                    f"not run: estimated peak {estimate / 2**30:.1f} GiB exceeds the memory cap {cap / 2**30:.1f} GiB"
                ))
            elif sweep.isolate and device.type == "cpu":
                outcomes[provider.name] = measure_isolated(
                    point, provider, mode, device, timing, options.mem_cap_bytes, options.child_timeout_s,
                )
            else:
                in_process.append(provider)
        probe_times: List[float] = []
        if in_process:
            if inputs is None:
                torch.manual_seed(0)
                inputs = workload.build(point, device)
            probe = _floor_probe(workload, point, suite, device)
            outcomes.update(measure_many(workload, in_process, mode, inputs, device, timing, probe, probe_times))
            del probe
        _write_roofline(writer, workload, point, mode, _point_rates(workload, point, suite, rates, probe_times))
        for provider in providers:
            _write_outcome(writer, point, provider, mode, outcomes[provider.name])
    del inputs
    _release(device)


def run_suite(suite: Suite, device: torch.device, out_dir: Path, options: RunOptions, kernels: Optional[Sequence[str]] = None,
              train: bool = True, plot: bool = True, table: bool = True) -> Path:
    with harness.quiet_garbage_collector(), harness.intra_op_threads(options.threads or suite.threads):
        return _run_suite(suite, device, out_dir, options, kernels, train, plot, table)


def _run_suite(suite: Suite, device: torch.device, out_dir: Path, options: RunOptions, kernels: Optional[Sequence[str]],
               train: bool, plot: bool, table: bool) -> Path:
    harness.prepare_host_memory()
    FusedLinearCalibrlLoss.liger_compiled = options.liger_compiled
    writer = ResultWriter(out_dir / "kernels.csv", device)
    sweeps = [s for s in suite.sweeps if (not kernels or s.kernel in kernels) and not (options.skip_isolated and s.isolate)]
    print(f"suite {suite.name} on {writer.device} ({device}, {torch.get_num_threads()} threads); results in {out_dir}; "
          f"version {writer.version}", flush=True)
    rates = measure_rates(suite, device, writer, [s.dtype for s in sweeps if s.kernel == "fused_linear_calibrl_loss"])
    print("floors: " + ", ".join(f"GEMM {k} {v / 1e12:.3f} TFLOP/s" for k, v in rates.gemm_flops.items())
          + f", copy {rates.copy_bytes_per_s / 1e9:.1f} GB/s", flush=True)
    writer.event(kind="rates", gemm_flops=rates.gemm_flops, copy_bytes_per_s=rates.copy_bytes_per_s, suite=suite.name,
                 threads=torch.get_num_threads(), skipped_isolated=options.skip_isolated)
    for sweep in sweeps:
        workload = WORKLOADS[sweep.kernel]
        for point in sweep.points():
            run_point(workload, sweep, point, suite, device, rates, writer, options)
    if train and suite.train:
        from . import bench_train

        bench_train.run(suite.train, device, out_dir / "train.csv", timestamp=writer.timestamp, version=writer.version,
                        threads=options.threads or suite.threads)
    if plot:
        from . import plot as plot_module

        for path in plot_module.render(out_dir, out_dir):
            print(f"plot: {path}")
    if table and suite.targets:
        from . import readme_table

        text = readme_table.render(out_dir, suite.targets)
        (out_dir / "readme_table.md").write_text(text)
        print(text)
    return out_dir


def default_mem_cap_bytes() -> float:
    """Half of the memory available now (the machine may be shared)."""
    return 0.5 * harness.available_host_memory_bytes()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, auto (default: the suite's)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    parser.add_argument("--kernels", nargs="+", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--providers", nargs="+", default=None,
                        help="keep only these providers (calibrl keeps every calibrl-*; roofline rows are always written)")
    parser.add_argument("--modes", nargs="+", choices=("forward", "full"), default=None)
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--compiled", dest="compiled", action="store_true", default=None,
                          help="run the compiled provider where the suite allows it")
    compiled.add_argument("--no-compiled", dest="compiled", action="store_false")
    parser.add_argument("--all-impls", action="store_true", help="also add calibrl-<impl> for the default backend")
    parser.add_argument("--allow-interpreter", action="store_true", help="benchmark Triton under TRITON_INTERPRET on CPU")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="skip/kill providers whose peak would exceed this (default: half the available RAM on "
                             "CPU; the free GPU memory on CUDA)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per isolated measurement")
    parser.add_argument("--liger-compiled", choices=("auto", "yes", "no"), default="auto",
                        help="Liger's own torch.compile of its loss math (auto: on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: every core)")
    parser.add_argument("--skip-isolated", action="store_true",
                        help="leave out the sweeps run in capped child processes (the Qwen-size head)")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step benchmark")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    suite = SUITES[args.suite]
    device = harness.resolve_device(args.device or suite.device)
    out_dir = harness.results_dir(device, args.out)
    options = RunOptions(
        providers=args.providers, modes=args.modes, compiled=args.compiled, all_impls=args.all_impls,
        allow_interpreter=args.allow_interpreter,
        mem_cap_bytes=(args.mem_cap_gib * 2**30 if args.mem_cap_gib is not None
                       else math.inf if device.type == "cuda" else default_mem_cap_bytes()),  # on CUDA: free GPU memory
        child_timeout_s=args.child_timeout,
        liger_compiled={"auto": None, "yes": True, "no": False}[args.liger_compiled],
        threads=args.threads, skip_isolated=args.skip_isolated,
    )
    run_suite(suite, device, out_dir, options, kernels=args.kernels, train=not args.no_train, plot=not args.no_plot,
              table=not args.no_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
