"""The README's performance tables, computed from benchmark CSVs: side-by-side ratios and the targets
of the README with "met" or "missed by X".

    python -m bench.readme_table bench/results/cpu-2core/ --targets cpu
    python -m bench.readme_table bench/results/nvidia-h100-80gb-hbm3/ --targets gpu

Times are p50. "x floor" is time / roofline (6*N*D*V FLOP over the same run's square-GEMM rate for the
linear op; bytes that must move over the same run's copy bandwidth for logits ops). Memory is the peak
above the inputs; "extra" subtracts what the target excludes (the gradients returned, or dWeight).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import harness
from .harness import MIB
from .providers import CALIBRL, COMPILED, EAGER, LIGER, ROOFLINE
from .workloads import WORKLOADS, Point

PROVIDER_ORDER = (EAGER, COMPILED, LIGER, ROOFLINE)


@dataclass(frozen=True)
class Shape:
    """A target's measurement point."""

    title: str
    kernel: str
    dims: Tuple[Tuple[str, int], ...]
    dtype: str
    mode: str = "full"

    @property
    def point(self) -> Point:
        return Point(self.kernel, "N", self.dims, self.dtype)


CPU_LINEAR = Shape("CPU fused linear, N 2048, D 512, V 32000, fp32, forward+backward", "fused_linear_calibrl_loss",
                   (("N", 2048), ("D", 512), ("V", 32000)), "float32")
CPU_QWEN_HEAD = Shape("CPU Qwen-size head, N 8192, D 896, V 151936, fp32, forward+backward", "fused_linear_calibrl_loss",
                      (("N", 8192), ("D", 896), ("V", 151936)), "float32")
CPU_QWEN_HEAD_1024 = Shape("CPU Qwen-size head, N 1024, D 896, V 151936, fp32, forward+backward",
                           "fused_linear_calibrl_loss", (("N", 1024), ("D", 896), ("V", 151936)), "float32")
CPU_LOGITS = Shape("CPU fused loss on logits, N 2048, V 32000, fp32, forward+backward", "fused_calibrl_loss",
                   (("N", 2048), ("V", 32000)), "float32")
CPU_TOKENS = Shape("CPU token log-probs + entropy, N 2048, V 32000, fp32, forward+backward", "token_logprobs",
                   (("N", 2048), ("V", 32000)), "float32")
GPU_LINEAR = Shape("GPU fused linear, N 16384, D 4096, V 151936, bf16, forward+backward", "fused_linear_calibrl_loss",
                   (("N", 16384), ("D", 4096), ("V", 151936)), "bfloat16")
GPU_LOGITS = Shape("GPU fused loss on logits, N 16384, V 151936, bf16, forward+backward", "fused_calibrl_loss",
                   (("N", 16384), ("V", 151936)), "bfloat16")
GPU_TOKENS = Shape("GPU token log-probs + entropy, N 16384, V 151936, bf16, forward+backward", "token_logprobs",
                   (("N", 16384), ("V", 151936)), "bfloat16")

SHAPES = {
    "cpu": (CPU_LINEAR, CPU_QWEN_HEAD_1024, CPU_QWEN_HEAD, CPU_LOGITS, CPU_TOKENS),
    "gpu": (GPU_LINEAR, GPU_LOGITS, GPU_TOKENS),
}


class Results:
    """Lookup of the latest rows and of the events (reasons) of a results folder or CSV."""

    def __init__(self, source) -> None:
        paths = harness.csv_files(Path(source))
        self.rows = harness.latest_rows(harness.read_rows(paths))
        self.events = harness.read_events(paths)
        self.index = {(r["kernel"], r["provider"], r["mode"], r["metric"], r["x_name"], r["x"]): r for r in self.rows}

    def value(self, shape: Shape, provider: str, metric: str) -> float:
        point = shape.point
        row = self.index.get((shape.kernel, provider, shape.mode, metric, point.x_name, float(point.x)))
        return math.nan if row is None else float(row["p50"])

    def providers(self, shape: Shape) -> List[str]:
        point = shape.point
        names = {r["provider"] for r in self.rows
                 if r["kernel"] == shape.kernel and r["mode"] == shape.mode and r["x_name"] == point.x_name
                 and r["x"] == float(point.x)}
        calibrl = sorted(n for n in names if n == CALIBRL or n.startswith(CALIBRL + "-"))
        return calibrl + [n for n in PROVIDER_ORDER if n in names]

    def reason(self, shape: Shape, provider: str) -> str:
        """Why a provider has no value at a shape (the latest failed / not-run / skipped event)."""
        point = shape.point
        found = ""
        for event in self.events:
            if (event.get("kernel") == shape.kernel and event.get("provider") == provider
                    and event.get("kind") in ("failed", "not-run", "skipped") and event.get("x") == point.x
                    and event.get("mode", shape.mode) == shape.mode):
                found = str(event.get("reason", ""))
        return found or "not measured"

    def resolved_impl(self, kernel: str) -> str:
        impls = [e.get("impl") for e in self.events if e.get("kind") == "info" and e.get("kernel") == kernel
                 and e.get("provider") == CALIBRL]
        return str(impls[-1]) if impls else "?"

    def machine(self) -> Dict[str, str]:
        info = {}
        for row in self.rows:
            if row["kernel"] == "gemm":
                info[f"GEMM {harness.parse_x_name(row['x_name'])[1].get('dtype', '')} {int(row['x'])}^3"] = f"{row['p50']:.3g} TFLOP/s"
            elif row["kernel"] == "copy":
                info["copy (read+write)"] = f"{row['p50']:.3g} GB/s"
        threads = sorted({str(e["threads"]) for e in self.events if e.get("kind") == "rates" and "threads" in e})
        if threads:
            info["torch threads"] = ", ".join(threads)
        devices = sorted({str(r["device"]) for r in self.rows})
        versions = sorted({str(r["version"]) for r in self.rows})
        stamps = sorted({str(r["timestamp"]) for r in self.rows})
        info["device"] = ", ".join(devices)
        info["version"] = ", ".join(versions)
        if stamps:
            info["runs"] = stamps[0] if len(stamps) == 1 else f"{stamps[0]} .. {stamps[-1]}"
        return info


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One requirement: measured(provider) compared with a limit."""

    title: str  # column header, the requirement in words
    shape: Shape
    measure: Callable[["Results", Shape, str], Tuple[float, str]]  # -> (value, what is missing)
    limit: float
    at_most: bool  # True: value <= limit; False: value >= limit
    unit: str  # "x", "%", " MiB"


def _ratio(other: str, metric: str = "speed", theirs_over_mine: bool = False):
    """A measure: this provider's ``metric`` over ``other``'s (or the inverse), and why ``other`` is missing."""
    def measure(results: Results, shape: Shape, provider: str):
        mine, theirs = results.value(shape, provider, metric), results.value(shape, other, metric)
        missing = "" if not math.isnan(theirs) else f"{other}: {results.reason(shape, other)}"
        return (theirs / mine if theirs_over_mine else mine / theirs), missing
    return measure


def _time_over(other: str):
    return _ratio(other)


def _their_time_over_mine(other: str):
    return _ratio(other, theirs_over_mine=True)


def _their_memory_over_mine(other: str):
    return _ratio(other, "memory", theirs_over_mine=True)


def _extra_memory(excluded_bytes: Callable[[Point], float]):
    def measure(results: Results, shape: Shape, provider: str):
        return results.value(shape, provider, "memory") - excluded_bytes(shape.point) / MIB, ""
    return measure


_linear = WORKLOADS["fused_linear_calibrl_loss"]
_logits = WORKLOADS["fused_calibrl_loss"]

TARGETS: Dict[str, Tuple[Target, ...]] = {
    "cpu": (
        Target("time / GEMM floor <= 1.15x", CPU_LINEAR, _time_over(ROOFLINE), 1.15, True, "x"),
        Target("faster than eager (time ratio < 1)", CPU_LINEAR, _time_over(EAGER), 1.0, True, "x"),
        Target("faster than Liger (time ratio < 1)", CPU_LINEAR, _time_over(LIGER), 1.0, True, "x"),
        Target("faster than compiled (time ratio < 1)", CPU_LINEAR, _time_over(COMPILED), 1.0, True, "x"),
        Target("memory beyond inputs and their gradients <= 64 MiB", CPU_LINEAR, _extra_memory(_linear.gradient_bytes),
               64.0, True, " MiB"),
        # The Qwen-size head: N 1024, where eager and compiled fit, and N 8192, where they do not.
        Target("N 1024, V 151936: time / GEMM floor <= 1.25x", CPU_QWEN_HEAD_1024, _time_over(ROOFLINE), 1.25, True, "x"),
        Target("N 1024, V 151936: faster than eager", CPU_QWEN_HEAD_1024, _time_over(EAGER), 1.0, True, "x"),
        Target("N 1024, V 151936: faster than compiled", CPU_QWEN_HEAD_1024, _time_over(COMPILED), 1.0, True, "x"),
        Target("N 1024, V 151936: faster than Liger", CPU_QWEN_HEAD_1024, _time_over(LIGER), 1.0, True, "x"),
        Target("N 8192, V 151936: time / GEMM floor <= 1.25x", CPU_QWEN_HEAD, _time_over(ROOFLINE), 1.25, True, "x"),
        Target("N 8192, V 151936: faster than Liger", CPU_QWEN_HEAD, _time_over(LIGER), 1.0, True, "x"),
    ),
    "gpu": (
        Target("linear: time / roofline <= 1.4x", GPU_LINEAR, _time_over(ROOFLINE), 1.4, True, "x"),
        Target("linear: memory beyond dWeight <= 256 MiB", GPU_LINEAR, _extra_memory(_linear.weight_gradient_bytes),
               256.0, True, " MiB"),
        Target("linear: >= 1.5x faster than Liger", GPU_LINEAR, _their_time_over_mine(LIGER), 1.5, False, "x"),
        Target("linear: >= 4x leaner than Liger", GPU_LINEAR, _their_memory_over_mine(LIGER), 4.0, False, "x"),
        Target("logits: >= 85% of the bandwidth floor", GPU_LOGITS, _their_time_over_mine(ROOFLINE), 0.85, False, "x"),
        Target("logits: memory beyond the logits' gradient <= 64 MiB", GPU_LOGITS, _extra_memory(_logits.gradient_bytes),
               64.0, True, " MiB"),
        Target("logits: faster than eager", GPU_LOGITS, _time_over(EAGER), 1.0, True, "x"),
        Target("logits: faster than compiled", GPU_LOGITS, _time_over(COMPILED), 1.0, True, "x"),
    ),
}


def verdict(target: Target, value: float, missing: str) -> str:
    if math.isnan(value):
        return f"not measured ({_short(missing, 70)})" if missing else "not measured"
    shown = f"{value:.0f}{target.unit}" if target.unit == " MiB" else f"{value:.2f}{target.unit}"
    met = value <= target.limit if target.at_most else value >= target.limit
    if met:
        return f"{shown}: met"
    gap = value - target.limit if target.at_most else target.limit - value
    if target.unit == " MiB":
        return f"{shown}: missed by {gap:.0f} MiB"
    return f"{shown}: missed by {gap:.2f}x ({100.0 * gap / target.limit:.0f}%)"


def _calibrl_label(results: Results, shape: Shape, provider: str) -> str:
    if provider == CALIBRL:
        return f"calibrl (default: {results.resolved_impl(shape.kernel)})"
    return provider


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def side_by_side(results: Results, shape: Shape, gpu: bool) -> List[str]:
    providers = results.providers(shape)
    if not providers:
        return [f"**{shape.title}**: no measurements.", ""]
    workload = WORKLOADS[shape.kernel]
    point = shape.point
    floor = results.value(shape, ROOFLINE, "speed")
    calibrl_time = results.value(shape, CALIBRL, "speed")
    grads = workload.gradient_bytes(point) / MIB
    header = ["provider", "time p50 (ms)", "x floor", "time / calibrl's", "peak above inputs (MiB)", "beyond gradients (MiB)"]
    if gpu:
        header.insert(3, "TFLOP/s" if shape.kernel == "fused_linear_calibrl_loss" else "GB/s moved")
    lines = [f"**{shape.title}** (floor: {_fmt(floor)} ms; gradients returned: {_fmt(grads)} MiB)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for provider in providers:
        time_ms = results.value(shape, provider, "speed")
        memory = results.value(shape, provider, "memory")
        if provider == ROOFLINE:
            cells = ["roofline", _fmt(time_ms), "1", _fmt(time_ms / calibrl_time), f"{_fmt(grads)} (floor)", "0"]
        elif math.isnan(time_ms) and math.isnan(memory):
            cells = [_calibrl_label(results, shape, provider), f"n/a: {_short(results.reason(shape, provider))}",
                     "", "", "", ""]
        else:
            cells = [_calibrl_label(results, shape, provider), _fmt(time_ms), _fmt(time_ms / floor),
                     _fmt(time_ms / calibrl_time), _fmt(memory), _fmt(memory - grads)]
        if gpu:
            if shape.kernel == "fused_linear_calibrl_loss":
                work = 6.0 * point.d["N"] * point.d["D"] * point.d["V"] / 1e12
            else:
                work = 3.0 * point.d["N"] * point.d["V"] * point.torch_dtype.itemsize / 1e9
            cells.insert(3, _fmt(work / (time_ms / 1e3)) if not math.isnan(time_ms) else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def targets_table(results: Results, target_set: str) -> List[str]:
    targets = TARGETS[target_set]
    providers: List[str] = []
    for target in targets:
        for name in results.providers(target.shape):
            if (name == CALIBRL or name.startswith(CALIBRL + "-")) and name not in providers:
                providers.append(name)
    if not providers:
        return ["No calibrl measurements at the targets' shapes.", ""]
    header = ["provider"] + [t.title for t in targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for provider in providers:
        cells = [_calibrl_label(results, targets[0].shape, provider)]
        for target in targets:
            value, missing = target.measure(results, target.shape, provider)
            if math.isnan(results.value(target.shape, provider, "speed")):
                missing = f"{provider}: {results.reason(target.shape, provider)}"
            cells.append(verdict(target, value, missing))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def qwen_head_lines(results: Results) -> List[str]:
    shape = CPU_QWEN_HEAD
    estimate = _linear.materialized_bytes(shape.point, "full") / 2**30
    if not results.providers(shape):
        return [f"Qwen-size head (N 8192, D 896, V 151936, fp32): not measured in this run (eager would need "
                f"~{estimate:.0f} GiB by estimate: fp32 logits, log-softmax, probabilities and their gradients).", ""]
    eager = results.value(shape, EAGER, "memory")
    eager_text = (f"{_fmt(eager)} MiB" if not math.isnan(eager)
                  else f"not measured ({_short(results.reason(shape, EAGER), 80)}); estimated ~{estimate:.0f} GiB")
    lines = ["Qwen-size head (N 8192, D 896, V 151936, fp32, forward+backward), peak memory above inputs:", ""]
    for provider in results.providers(shape):
        if provider in (EAGER, ROOFLINE):
            continue
        memory = results.value(shape, provider, "memory")
        text = f"{_fmt(memory)} MiB" if not math.isnan(memory) else f"n/a ({_short(results.reason(shape, provider), 80)})"
        lines.append(f"- {_calibrl_label(results, shape, provider)}: {text}")
    lines += [f"- eager: {eager_text}", ""]
    return lines


def train_lines(results: Results) -> List[str]:
    rows = [r for r in results.rows if r["kernel"] == "train_step"]
    if not rows:
        return []
    lines = ["Train step (Qwen2-architecture model built in code; tokens/s = B*(P+T) per step):", "",
             "| sizes | provider | tokens/s p50 | vs eager | peak above state (MiB) |", "|---|---|---|---|---|"]
    for (x_name, x) in sorted({(r["x_name"], r["x"]) for r in rows}, key=lambda k: (k[0], k[1])):
        at = {(r["provider"], r["metric"]): r["p50"] for r in rows if r["x_name"] == x_name and r["x"] == x}
        eager = at.get((EAGER, "speed"), math.nan)
        for provider in sorted({p for p, _ in at}, key=lambda p: (p == EAGER, p)):
            speed, memory = at.get((provider, "speed"), math.nan), at.get((provider, "memory"), math.nan)
            sizes = x_name.replace("T;", f"T={int(x)};", 1)
            lines.append(f"| {sizes} | {provider} | {_fmt(speed)} | {_fmt(speed / eager)}x | {_fmt(memory)} |")
    lines.append("")
    return lines


def render(source, target_set: str) -> str:
    """The markdown of the performance tables for a results folder or CSV."""
    if target_set not in TARGETS:
        raise ValueError(f"target_set: expected one of {sorted(TARGETS)}, got {target_set!r}")
    results = Results(source)
    gpu = target_set == "gpu"
    info = results.machine()
    lines = ["Measured on " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".", "",
             "Targets:", ""]
    lines += targets_table(results, target_set)
    if target_set == "cpu":
        lines += qwen_head_lines(results)
    lines += ["Side by side (time / calibrl's > 1 means slower than calibrl):", ""]
    for shape in SHAPES[target_set]:
        lines += side_by_side(results, shape, gpu)
    lines += train_lines(results)
    return "\n".join(lines)


def sweep_table(source, mode: str = "full") -> str:
    """One markdown table per swept kernel and fixed sizes: a row per x, a column per provider holding its
    p50 time, its time over the floor and over calibrl's (``python -m bench.readme_table DIR --sweeps``)."""
    results = Results(source)
    series: Dict[Tuple[str, str], Dict[float, Dict[str, float]]] = {}
    for row in results.rows:
        if row["metric"] == "speed" and row["mode"] == mode and row["kernel"] in WORKLOADS:
            at = series.setdefault((row["kernel"], row["x_name"]), {}).setdefault(row["x"], {})
            at[row["provider"]] = float(row["p50"])
    lines: List[str] = []
    for (kernel, name), by_x in sorted(series.items()):
        names = {provider for values in by_x.values() for provider in values}
        providers = sorted(n for n in names if n == CALIBRL or n.startswith(CALIBRL + "-"))
        providers += [n for n in PROVIDER_ORDER if n in names and n != ROOFLINE]
        header = [name.split(";")[0]] + [f"{p} ms (x floor, / calibrl)" for p in providers]
        lines += [f"**{kernel}, {name}, {mode}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for x, values in sorted(by_x.items()):
            floor, mine = values.get(ROOFLINE, math.nan), values.get(CALIBRL, math.nan)
            cells = [f"{x:g}"]
            for provider in providers:
                t = values.get(provider, math.nan)
                cells.append("n/a" if math.isnan(t) else f"{_fmt(t)} ({t / floor:.2f}x, {t / mine:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) if lines else "No sweep measurements."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a results folder or CSV")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="cpu")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plots", action="store_true", help="also render the PNGs (bench.plot) beside the CSVs")
    parser.add_argument("--sweeps", action="store_true", help="per-sweep tables (time over the floor per provider) "
                        "instead of the targets' tables")
    args = parser.parse_args(argv)
    if args.plots:
        from . import plot

        for path in plot.render(args.source):
            print(f"plot: {path}")
    text = sweep_table(args.source) if args.sweeps else render(args.source, args.targets)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
