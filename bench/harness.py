"""Measurement primitives shared by every benchmark: timing percentiles, peak memory, machine floors, CSV.

Timing: ``warmup`` untimed calls, then timed calls (device synchronised around each) until both
``min_reps`` and ``min_time_s`` are reached or ``max_reps`` is hit; we report p20 / p50 / p80.

Peak memory of one call, above what was allocated before it (the inputs):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation
  before the call.
- CPU (Linux): the process's resident-set high-water mark. Writing "5" to ``/proc/self/clear_refs``
  resets ``VmHWM`` to the current ``VmRSS``; after the call ``VmHWM - VmRSS(before)`` is the peak.
  For this to see every tensor, glibc must hand large blocks to ``mmap`` (returned to the system on
  free) instead of recycling freed heap memory, so during the measurement only the mmap threshold is
  lowered to 64 KiB and free heap pages are trimmed first; outside it the threshold is fixed at
  32 MiB, the value glibc's own dynamic threshold settles at, so that timings are not disturbed by
  the measurement order. Blocks under 64 KiB (Python objects, small tensors) are not seen.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

CSV_COLUMNS = (
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x", "p20", "p50", "p80", "device", "timestamp", "version",
)
MODES = ("forward", "full")
METRICS = ("speed", "memory")
MIB = 1024.0 * 1024.0
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------------
# Device, version, time stamps
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {name!r} but CUDA is not available")
    return device


def sanitize(name: str) -> str:
    """A folder-safe lower-case name: letters, digits, '.', '_' and '-' only."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower())
    return re.sub(r"-{2,}", "-", cleaned).strip("-") or "unknown"


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """'cpu-2core', or the sanitized GPU name, e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type == "cuda":
        return sanitize(torch.cuda.get_device_name(device))
    return f"cpu-{cpu_count()}core"


def results_dir(device: torch.device, out: Optional[str] = None) -> Path:
    """Where a run writes: ``out`` when given, else bench/results/<device name>/."""
    path = Path(out) if out else RESULTS_ROOT / device_name(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def version_string() -> str:
    """calibrl_kernels' version plus the git commit of the checkout (and '.dirty' if modified)."""
    from calibrl_kernels import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not sha:
        return __version__
    return f"{__version__}+g{sha}" + (".dirty" if dirty else "")


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_garbage_collector() -> Iterator[None]:
    """Move every object alive now out of the collector's reach for the block (``gc.freeze``).

    The measurements call ``gc.collect()`` often (so that no cyclic garbage holds tensors); with
    transformers and torch imported a full collection scans millions of objects (~0.5 s), most of
    them modules that live forever. Frozen, they are skipped; objects made inside the block are not.
    """
    global _FREEZE_DEPTH
    if _FREEZE_DEPTH == 0:
        gc.collect()
        gc.freeze()
    _FREEZE_DEPTH += 1
    try:
        yield
    finally:
        _FREEZE_DEPTH -= 1
        if _FREEZE_DEPTH == 0:
            gc.unfreeze()


_FREEZE_DEPTH = 0  # nesting depth of quiet_garbage_collector


@contextlib.contextmanager
def intra_op_threads(threads: Optional[int]) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block (None: leave it)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimingConfig:
    """How many calls a measurement makes."""

    warmup: int = 1  # untimed calls first (compilation, lazy initialisation, caches)
    min_reps: int = 5  # at least this many timed calls
    max_reps: int = 50  # at most this many timed calls
    min_time_s: float = 1.0  # keep timing until this much time was spent (within max_reps)
    memory_reps: int = 1  # separate calls measuring peak memory (after warm-up, before timing)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def time_call(fn: Callable[[], object], device: torch.device, config: TimingConfig) -> List[float]:
    """Seconds per call of ``fn`` (warm-up calls excluded)."""
    for _ in range(config.warmup):
        result = fn()
        synchronize(device)
        del result
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < config.max_reps and (len(times) < config.min_reps or time.perf_counter() - started < config.min_time_s):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        del result
    return times


def percentiles(values: Sequence[float]) -> tuple:
    """(p20, p50, p80) with linear interpolation; NaNs for an empty sequence."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return (math.nan, math.nan, math.nan)

    def at(q: float) -> float:
        position = q * (len(data) - 1)
        low = int(math.floor(position))
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (position - low)

    return (at(0.2), at(0.5), at(0.8))


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------
class _Glibc:
    """The two glibc malloc knobs the CPU memory measurement needs (no-ops elsewhere)."""

    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    EXACT_MMAP_THRESHOLD = 64 * 1024  # during a measurement: every block >= 64 KiB is its own mapping
    STEADY_MMAP_THRESHOLD = 32 * 1024 * 1024  # otherwise: glibc's dynamic threshold's ceiling

    def __init__(self) -> None:
        self.libc = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                libc = ctypes.CDLL(name)
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    self.libc = libc
            except OSError:
                pass
        self.steady()

    def exact(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.EXACT_MMAP_THRESHOLD)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, self.EXACT_MMAP_THRESHOLD)
            self.libc.malloc_trim(0)

    def steady(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.STEADY_MMAP_THRESHOLD)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 2 * self.STEADY_MMAP_THRESHOLD)


_GLIBC: Optional[_Glibc] = None


def _glibc() -> _Glibc:
    global _GLIBC
    if _GLIBC is None:
        _GLIBC = _Glibc()
    return _GLIBC


def _proc_status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no field {field}")


def process_rss_bytes(pid: int) -> int:
    """Resident set of another process (0 once it is gone)."""
    try:
        return _proc_status_kib("VmRSS", str(pid)) * 1024
    except (OSError, RuntimeError):
        return 0


def cpu_memory_method() -> Optional[str]:
    """The CPU peak-memory method available here, or None (then CPU memory is not measured)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        _proc_status_kib("VmHWM")
        _glibc()
        return "rss-hwm"
    except (OSError, RuntimeError):
        return None


def prepare_host_memory() -> None:
    """Fix glibc's mmap threshold for the whole run (call once, before any timing)."""
    _glibc()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during one call of ``fn`` above the allocation before it (NaN if unmeasurable)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return float(peak)
    if cpu_memory_method() is None:
        return math.nan
    glibc = _glibc()
    glibc.exact()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _proc_status_kib("VmRSS")
        result = fn()
        peak = _proc_status_kib("VmHWM") - before
        del result
    finally:
        glibc.steady()
    return float(max(peak, 0) * 1024)


def available_host_memory_bytes() -> float:
    """MemAvailable of /proc/meminfo (inf where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return math.inf


def free_device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    return available_host_memory_bytes()


# --------------------------------------------------------------------------------------------
# Machine floors (measured in the same run as the kernels)
# --------------------------------------------------------------------------------------------
def gemm_call(device: torch.device, dtype: torch.dtype, size: int) -> Callable[[], torch.Tensor]:
    """A square (size x size) @ (size x size) product in ``dtype``: 2 * size^3 FLOP per call."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def copy_call(device: torch.device, nbytes: int) -> Callable[[], torch.Tensor]:
    """A device-to-device copy of ``nbytes``: it moves 2 * nbytes (one read, one write) per call."""
    source = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def gemm_seconds(device: torch.device, dtype: torch.dtype, size: int, config: TimingConfig) -> List[float]:
    return time_call(gemm_call(device, dtype, size), device, config)


def copy_seconds(device: torch.device, nbytes: int, config: TimingConfig) -> List[float]:
    return time_call(copy_call(device, nbytes), device, config)


# --------------------------------------------------------------------------------------------
# CSV and events
# --------------------------------------------------------------------------------------------
def format_number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.6g}"


class ResultWriter:
    """Appends long-format rows to a CSV (header written once) and events to a JSON-lines file.

    Every row of one run shares ``timestamp``, ``device`` and ``version``. A provider that failed or
    was skipped gets rows with NaN values (so the CSV shows it was tried) and an event with the reason.
    """

    def __init__(self, csv_path: Path, device: torch.device, timestamp: Optional[str] = None, version: Optional[str] = None):
        self.csv_path = Path(csv_path)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self.events_path = self.csv_path.with_name(self.csv_path.stem + ".events.jsonl")
        self.device = device_name(device)
        self.timestamp = timestamp or utc_timestamp()
        self.version = version or version_string()
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as existing:
                header = next(csv.reader(existing), None)
            if tuple(header or ()) != CSV_COLUMNS:
                raise ValueError(f"{self.csv_path}: expected the header {','.join(CSV_COLUMNS)}, found {header}")
        else:
            with open(self.csv_path, "w", newline="") as fresh:
                csv.writer(fresh).writerow(CSV_COLUMNS)

    def row(self, kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x, values: Sequence[float]) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        p20, p50, p80 = values
        with open(self.csv_path, "a", newline="") as out:
            csv.writer(out).writerow([
                kernel, provider, mode, metric, unit, x_name, x, format_number(p20), format_number(p50),
                format_number(p80), self.device, self.timestamp, self.version,
            ])

    def event(self, **fields) -> None:
        fields.setdefault("timestamp", self.timestamp)
        fields.setdefault("device", self.device)
        with open(self.events_path, "a") as out:
            out.write(json.dumps(fields, sort_keys=True, default=str) + "\n")


def csv_files(path: Path) -> List[Path]:
    """A CSV file itself, or every *.csv under a folder."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.csv"))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such CSV file or folder")


def read_rows(paths: Iterable[Path]) -> List[Dict[str, object]]:
    """Rows of long-format CSVs, values as floats (NaN for 'nan'), x as float."""
    rows: List[Dict[str, object]] = []
    for path in paths:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise ValueError(f"{path}: expected the columns {','.join(CSV_COLUMNS)}, found {reader.fieldnames}")
            for raw in reader:
                row: Dict[str, object] = dict(raw)
                row["x"] = float(raw["x"])
                for key in ("p20", "p50", "p80"):
                    row[key] = float(raw[key])
                rows.append(row)
    return rows


def latest_rows(rows: Iterable[Dict[str, object]]) -> List[Dict[str, object]]:
    """For each (kernel, provider, mode, metric, x_name, x, device), the row of the latest run."""
    chosen: Dict[tuple, Dict[str, object]] = {}
    for row in rows:
        key = (row["kernel"], row["provider"], row["mode"], row["metric"], row["x_name"], row["x"], row["device"])
        if key not in chosen or str(row["timestamp"]) >= str(chosen[key]["timestamp"]):
            chosen[key] = row
    return list(chosen.values())


def read_events(paths: Iterable[Path]) -> List[dict]:
    """Events written beside the given CSV files (missing files are fine)."""
    events: List[dict] = []
    for path in paths:
        events_path = Path(path).with_name(Path(path).stem + ".events.jsonl")
        if events_path.exists():
            with open(events_path) as handle:
                events.extend(json.loads(line) for line in handle if line.strip())
    return events


def x_name(axis: str, **fixed) -> str:
    """'N; D=512; V=32000; dtype=float32': the swept axis, then the fixed dimensions."""
    return "; ".join([axis] + [f"{key}={value}" for key, value in fixed.items()])


def parse_x_name(name: str) -> tuple:
    """Inverse of x_name: (axis, {fixed key: value string})."""
    parts = [part.strip() for part in str(name).split(";")]
    fixed = {}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        fixed[key.strip()] = value.strip()
    return parts[0], fixed
