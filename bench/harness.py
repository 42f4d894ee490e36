"""The one timing harness of bench/: interleaved rounds, peak memory, long-format CSV and events (the method:
docs/benchmarks.md, "What is measured")."""

from __future__ import annotations

import contextlib
import csv
import ctypes.util
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

CSV_COLUMNS = tuple("kernel provider mode metric unit x_name x p20 p50 p80 device timestamp version".split())
MODES, METRICS = ("forward", "full"), ("speed", "memory")
MIB = float(2**20)
RESULTS = Path(__file__).resolve().parent / "results"
CUDA_WARMUP_MS, CUDA_REP_MS = 25, 100  # do_bench's budget per provider and round


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup: int = 1  # untimed calls first (compilation, caches)
    min_rounds: int = 3
    max_rounds: int = 15
    min_time_s: float = 1.0  # per provider: keep adding rounds (up to max_rounds) until this much was spent


@dataclasses.dataclass
class Outcome:
    status: str  # "ok", "failed" or "not-run" (the latter two give NaN rows and an event with the reason)
    seconds: List[float] = dataclasses.field(default_factory=list)
    peak_bytes: float = math.nan
    reason: str = ""


def resolve_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {name!r} but CUDA is not available")
    return device


def device_name(device: torch.device) -> str:
    """'cpu-2core' (the CPUs this process may use), or the GPU's name, e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9._-]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"cpu-{cores}core"


def results_folder(out: Optional[str], device: torch.device) -> Path:
    return Path(out) if out else RESULTS / device_name(device)


def version_string() -> str:
    """calibrl_kernels' version plus the checkout's commit ('.dirty' when tracked files changed)."""
    from calibrl_kernels import __version__

    describe = ["git", "describe", "--always", "--dirty=.dirty", "--exclude=*"]  # the short commit, never a tag
    try:
        done = subprocess.run(describe, cwd=RESULTS.parent.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{done.stdout.strip()}" if done.returncode == 0 else __version__


@contextlib.contextmanager
def intra_op_threads(count: Optional[int]):
    """torch's intra-op threads set to ``count`` (None: unchanged) inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def percentiles(values: Sequence[float]) -> tuple:
    """(p20, p50, p80), linearly interpolated; NaNs for no values."""
    data = [v for v in values if not math.isnan(v)]
    if len(data) < 2:
        return (data[0] if data else math.nan,) * 3
    quintiles = statistics.quantiles(data, n=5, method="inclusive")
    return (quintiles[0], statistics.median(data), quintiles[3])


# Peak memory
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if os.name == "posix" else None
_EXACT, _STEADY = 64 * 1024, 32 * 2**20  # glibc mmap thresholds during / outside a CPU memory measurement


def _malloc_threshold(threshold: int) -> None:
    """Blocks of ``threshold`` bytes or more get their own mapping, returned to the system when freed."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, threshold if threshold == _EXACT else 2 * threshold)  # M_TRIM_THRESHOLD
        if threshold == _EXACT:
            _LIBC.malloc_trim(0)


_malloc_threshold(_STEADY)  # fixed for the whole run, so that timings do not depend on the measurement order


def _proc_kib(path: str, field: str) -> int:
    with open(path) as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))


def peak_bytes(call: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during one call above the allocation before it (NaN where unmeasurable)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        synchronize(device)
        del result
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        _malloc_threshold(_EXACT)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
        before = _proc_kib("/proc/self/status", "VmRSS")
        result = call()
        peak = _proc_kib("/proc/self/status", "VmHWM") - before
        del result
    except (OSError, StopIteration):  # not Linux, or /proc is read-only
        return math.nan
    finally:
        _malloc_threshold(_STEADY)
    return float(max(peak, 0) * 1024)


def available_bytes(device: torch.device) -> float:
    """Free GPU memory, or the host's MemAvailable (inf where unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return _proc_kib("/proc/meminfo", "MemAvailable") * 1024.0
    except (OSError, StopIteration):
        return math.inf


def measure(calls: Dict[str, Callable], device: torch.device, timing: Timing, contexts=None) -> Dict[str, Outcome]:
    """Warm up and take the peak memory of every call, then time them interleaved, one call of each per round, each
    inside its ``contexts`` factory if any (a forced backend); a call that raises is recorded as failed."""
    outcomes: Dict[str, Outcome] = {}
    live = dict(calls)

    def attempt(name: str, run: Callable[[], None]) -> None:
        try:
            with (contexts or {}).get(name, contextlib.nullcontext)():
                run()
        except Exception as error:  # a compile failure, out of memory, a backend error: record it, go on
            outcomes[name] = Outcome("failed", reason=f"{type(error).__name__}: {' '.join(str(error).split())[:400]}")
            del live[name]
            release(device)

    def warm_up(name: str) -> None:
        for _ in range(timing.warmup):
            calls[name]()
        synchronize(device)
        outcomes[name] = Outcome("ok", peak_bytes=peak_bytes(calls[name], device))

    for name in calls:
        attempt(name, lambda: warm_up(name))
    started, rounds = time.perf_counter(), 0
    while live and rounds < timing.max_rounds:
        if rounds >= timing.min_rounds and time.perf_counter() - started >= timing.min_time_s * len(live):
            break
        for name in list(live):
            attempt(name, lambda: outcomes[name].seconds.append(_one_round(calls[name], device)))
        rounds += 1
    release(device)
    return outcomes


def _one_round(call: Callable[[], object], device: torch.device) -> float:
    """triton.testing.do_bench's median on CUDA, one perf_counter-timed call on CPU. (Not
    torch.utils.benchmark's Timer: its timeit runs two warm-up calls before each timed one, which would
    triple every CPU round and run each provider three times in a row instead of interleaving them.)"""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(call, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median") / 1e3
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def x_name(axis: str, fixed: Dict[str, object]) -> str:
    """'N; D=512; V=32000; dtype=float32': the swept axis, then the fixed sizes."""
    return "; ".join([axis] + [f"{key}={value}" for key, value in fixed.items()])


def _check_header(path: Path, header: Optional[Sequence[str]]) -> None:
    if tuple(header or ()) != CSV_COLUMNS:
        raise ValueError(f"{path}: expected the header {','.join(CSV_COLUMNS)}, found {header}")


class Writer:
    """Appends rows to ``<name>.csv`` (header once) and reasons to ``<name>.events.jsonl`` in ``folder``."""

    def __init__(self, folder: Path, name: str, device: torch.device, timestamp: Optional[str] = None):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.csv_path, self.events_path = Path(folder) / f"{name}.csv", Path(folder) / f"{name}.events.jsonl"
        self.device, self.version = device_name(device), version_string()
        self.timestamp = timestamp or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as existing:
                _check_header(self.csv_path, next(csv.reader(existing), None))
        else:
            with open(self.csv_path, "w", newline="") as fresh:
                csv.writer(fresh).writerow(CSV_COLUMNS)

    def row(self, kernel: str, provider: str, mode: str, metric: str, unit: str, name: str, x, values) -> None:
        if mode not in MODES or metric not in METRICS:
            raise ValueError(f"mode, metric: expected one of {MODES} and {METRICS}, got {mode!r}, {metric!r}")
        with open(self.csv_path, "a", newline="") as out:
            fields = [kernel, provider, mode, metric, unit, name, x, *(f"{v:.6g}" for v in values)]
            csv.writer(out).writerow(fields + [self.device, self.timestamp, self.version])

    def outcome(self, kernel, provider, mode, name, x, outcome: Outcome, unit="ms", per_second=None) -> None:
        """Speed (ms per call, or ``per_second`` / time in ``unit``, e.g. tokens/s) and memory rows of one provider."""
        if outcome.status != "ok":
            self.event(kind=outcome.status, kernel=kernel, provider=provider, mode=mode, x=x, reason=outcome.reason)
        speeds = percentiles([per_second / s if per_second else s * 1e3 for s in outcome.seconds])
        self.row(kernel, provider, mode, "speed", unit, name, x, speeds)
        self.row(kernel, provider, mode, "memory", "MiB", name, x, [outcome.peak_bytes / MIB] * 3)
        shown = f"p50 {speeds[1]:10.4g} {unit:8s} peak +{outcome.peak_bytes / MIB:9.1f} MiB"
        shown = shown if outcome.status == "ok" else f"{outcome.status}: {outcome.reason}"
        print(f"  {provider:16s} {mode:7s} {shown}", flush=True)

    def event(self, **fields) -> None:
        with open(self.events_path, "a") as out:
            out.write(json.dumps(dict(fields, timestamp=self.timestamp), sort_keys=True, default=str) + "\n")


def read_rows(source) -> List[dict]:
    """The latest row of each (kernel, provider, mode, metric, x_name, x, device) in a CSV or a folder of them."""
    source = Path(source)
    latest: Dict[tuple, dict] = {}
    for path in sorted(source.rglob("*.csv")) if source.is_dir() else [source]:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            _check_header(path, reader.fieldnames)
            for row in reader:
                row.update({key: float(row[key]) for key in ("x", "p20", "p50", "p80")})
                key = tuple(row[k] for k in ("kernel", "provider", "mode", "metric", "x_name", "x", "device"))
                if key not in latest or row["timestamp"] >= latest[key]["timestamp"]:
                    latest[key] = row
    return list(latest.values())
