"""Markdown tables and PNG plots of benchmark CSVs (the latest run of each point):
``python -m bench.table bench/results/cpu-2core/ [--out tables.md] [--plots]``."""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import List, Optional, Sequence

from .harness import METRICS, MODES, read_rows


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def render(source) -> str:
    """Per kernel, sizes and mode: each provider's p50, over the roofline's and calibrl's (train: eager's), peak."""
    rows = read_rows(source)
    cells = defaultdict(dict)  # (kernel, x_name, mode, x) -> {(provider, metric): p50}
    for row in rows:
        cells[(row["kernel"], row["x_name"], row["mode"], row["x"])][(row["provider"], row["metric"])] = row["p50"]
    devices, versions = (", ".join(sorted({row[key] for row in rows})) for key in ("device", "version"))
    stamps = sorted({row["timestamp"] for row in rows})
    runs = stamps[0] + (" .. " + stamps[-1] if len(stamps) > 1 else "") if stamps else "-"
    lines = [f"Measured on {devices}; version {versions}; runs {runs}.", ""]
    for (kernel, x_name, mode, x), at in sorted(cells.items()):
        train = kernel == "train_step"
        bases = ("eager",) if train else ("roofline", "calibrl")  # the providers each time is divided by
        columns = ["tokens/s p50" if train else "ms p50", *(f"/ {b}" for b in bases)]
        columns.append("peak (MiB)" if train else "peak above inputs (MiB)")
        title = f"**{kernel}{'' if train else ', ' + mode}, {x_name.split(';')[0]}={x:g}; {x_name.partition('; ')[2]}**"
        lines += [title, "", "| provider | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for provider in sorted({p for p, _ in at}, key=lambda p: (not p.startswith("calibrl"), p == "roofline", p)):
            speed = at.get((provider, "speed"), math.nan)
            ratios = [_fmt(speed / at.get((base, "speed"), math.nan)) for base in bases]
            fields = [provider, _fmt(speed), *ratios, _fmt(at.get((provider, "memory"), math.nan))]
            lines.append("| " + " | ".join(fields) + " |")
        lines.append("")
    return "\n".join(lines)


def _draw(axis, rows: List[dict]) -> bool:
    by_provider = defaultdict(list)
    for row in sorted((r for r in rows if not math.isnan(r["p50"])), key=lambda r: r["x"]):
        by_provider[row["provider"]].append(row)
    for provider in sorted(by_provider, key=lambda name: (name == "roofline", name)):
        points = by_provider[provider]
        xs, p50 = [r["x"] for r in points], [r["p50"] for r in points]
        if provider == "roofline":
            axis.plot(xs, p50, "k--", marker="_", markersize=14, label="roofline (floor)")
        else:
            (line,) = axis.plot(xs, p50, marker="o", label=provider)
            band = ([r["p20"] for r in points], [r["p80"] for r in points])
            axis.fill_between(xs, *band, color=line.get_color(), alpha=0.15)
        axis.set_ylabel(points[0]["unit"])
    if by_provider:
        axis.set_xscale("log", base=2)
        positive = all(r["p20"] > 0 for group in by_provider.values() for r in group)
        axis.set_yscale("log" if positive else "linear")  # a tiny kernel's memory can be 0
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    return bool(by_provider)


def plot(source, out_dir=None) -> List[Path]:
    """One PNG per (device, kernel, sweep) of the CSV(s) at ``source`` (beside them by default); returns the paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    source = Path(source)
    out = Path(out_dir) if out_dir is not None else (source if source.is_dir() else source.parent)
    out.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for row in read_rows(source):
        groups[(row["device"], row["kernel"], row["x_name"])].append(row)
    several_devices = len({device for device, _, _ in groups}) > 1
    written = []
    for (device, kernel, x_name), group in sorted(groups.items()):
        metrics = [m for m in METRICS if any(r["metric"] == m for r in group)]
        modes = [m for m in MODES if any(r["mode"] == m for r in group)]
        shape = (len(metrics), len(modes))
        figure = Figure(figsize=(5.5 * shape[1], 4 * shape[0]))
        axes = figure.subplots(*shape, squeeze=False)
        for i, metric in enumerate(metrics):
            for j, mode in enumerate(modes):
                drawn = _draw(axes[i][j], [r for r in group if r["metric"] == metric and r["mode"] == mode])
                axes[i][j].set_visible(drawn)
                axes[i][j].set_title(f"{metric} / {mode}")
                axes[i][j].set_xlabel(x_name.split(";")[0])
        figure.suptitle(f"{kernel} on {device}\n{x_name}   (version {group[0]['version']})", fontsize="medium")
        figure.tight_layout()
        name = f"{kernel}__" + re.sub(r"[^a-z0-9._-]+", "-", x_name.lower().replace("; ", "_").replace("=", ""))
        path = out / (f"{device}__{name}.png" if several_devices else f"{name}.png")
        figure.savefig(path, dpi=90)
        written.append(path)
    return written


def report(source, plots: bool, out=None) -> str:
    """The PNGs beside the CSV(s) at ``source`` (with ``plots``) and the markdown, also written to ``out``."""
    for path in plot(source) if plots else ():
        print(f"plot: {path}")
    text = render(source)
    if out:
        Path(out).write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a results folder or CSV")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plots", action="store_true", help="also render the PNGs beside the CSVs")
    args = parser.parse_args(argv)
    print(report(args.source, args.plots, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
