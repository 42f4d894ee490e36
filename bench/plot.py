"""Render benchmark CSVs as PNGs: one figure per kernel and sweep, time and memory against size.

    python -m bench.plot bench/results/cpu-2core/            # every *.csv under the folder
    python -m bench.plot kernels.csv --out /tmp/plots

Each figure has a row per metric (speed, memory) and a column per mode (forward, full); one line
per provider (p50, with the p20-p80 band), the roofline dashed. Where a CSV holds several runs of
the same point, the latest run is drawn.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import harness
from .providers import ROOFLINE

MACHINE_KERNELS = ("gemm", "copy")  # the floors' own rows: numbers, not curves
METRIC_ORDER = ("speed", "memory")
MODE_ORDER = ("forward", "full")


def _figure_groups(rows: List[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for row in rows:
        if row["kernel"] in MACHINE_KERNELS:
            continue
        groups[(row["device"], row["kernel"], row["x_name"])].append(row)
    return groups


def _draw(axis, rows: List[dict], metric: str, mode: str) -> bool:
    by_provider: Dict[str, List[dict]] = defaultdict(list)
    for row in rows:
        if row["metric"] == metric and row["mode"] == mode:
            by_provider[row["provider"]].append(row)
    drawn = False
    positive = True  # a log axis needs positive values (a tiny kernel's memory can be 0)
    unit = ""
    for provider in sorted(by_provider, key=lambda name: (name == ROOFLINE, name)):
        points = sorted((r for r in by_provider[provider] if not math.isnan(r["p50"])), key=lambda r: r["x"])
        if not points:
            continue
        unit = points[0]["unit"]
        xs = [r["x"] for r in points]
        positive = positive and all(r["p20"] > 0 for r in points)
        if provider == ROOFLINE:
            label = "roofline (GEMM / bandwidth floor)" if metric == "speed" else "floor (gradients returned)"
            axis.plot(xs, [r["p50"] for r in points], "k--", marker="_", markersize=14, label=label, linewidth=1.5)
        else:
            line, = axis.plot(xs, [r["p50"] for r in points], marker="o", label=provider)
            axis.fill_between(xs, [r["p20"] for r in points], [r["p80"] for r in points], color=line.get_color(), alpha=0.15)
        drawn = True
    if drawn:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log" if positive else "linear")
        axis.set_title(f"{metric} / {mode}")
        axis.set_ylabel(unit)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    return drawn


def render(source, out_dir=None) -> List[Path]:
    """Write one PNG per (device, kernel, sweep) of the CSV(s) at ``source``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = harness.csv_files(Path(source))
    rows = harness.latest_rows(harness.read_rows(paths))
    out = Path(out_dir) if out_dir is not None else (Path(source) if Path(source).is_dir() else Path(source).parent)
    out.mkdir(parents=True, exist_ok=True)
    groups = _figure_groups(rows)
    several_devices = len({device for device, _, _ in groups}) > 1
    written: List[Path] = []
    for (device, kernel, x_name), group in sorted(groups.items()):
        metrics = [m for m in METRIC_ORDER if any(r["metric"] == m for r in group)]
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in group)]
        if not metrics or not modes:
            continue
        figure, axes = plt.subplots(len(metrics), len(modes), figsize=(5.5 * len(modes), 4.0 * len(metrics)), squeeze=False)
        any_drawn = False
        for i, metric in enumerate(metrics):
            for j, mode in enumerate(modes):
                if not _draw(axes[i][j], group, metric, mode):
                    axes[i][j].set_visible(False)
                else:
                    any_drawn = True
                axes[i][j].set_xlabel(harness.parse_x_name(x_name)[0])
        if not any_drawn:
            plt.close(figure)
            continue
        version = group[0]["version"]
        figure.suptitle(f"{kernel} on {device}\n{x_name}   (version {version})", fontsize="medium")
        figure.tight_layout()
        name = f"{kernel}__{harness.sanitize(x_name.replace('; ', '_').replace('=', ''))}.png"
        if several_devices:
            name = f"{device}__{name}"
        path = out / name
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a benchmark CSV or a folder of them")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: beside the CSV)")
    args = parser.parse_args(argv)
    for path in render(args.source, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
