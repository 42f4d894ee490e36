"""Benchmark CSVs as PNGs (``python -m bench.table DIR --plots``): one figure per kernel and sweep, a row per
metric, a column per mode, a line per provider (p50, p20-p80 band), the roofline dashed; the latest run of a point.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import List

from .harness import METRICS, MODES, read_rows


def _draw(axis, rows: List[dict]) -> bool:
    by_provider = defaultdict(list)
    for row in rows:
        if not math.isnan(row["p50"]):
            by_provider[row["provider"]].append(row)
    for provider in sorted(by_provider, key=lambda name: (name == "roofline", name)):
        points = sorted(by_provider[provider], key=lambda r: r["x"])
        xs, p50 = [r["x"] for r in points], [r["p50"] for r in points]
        if provider == "roofline":
            axis.plot(xs, p50, "k--", marker="_", markersize=14, label="roofline (floor)")
        else:
            (line,) = axis.plot(xs, p50, marker="o", label=provider)
            axis.fill_between(
                xs, [r["p20"] for r in points], [r["p80"] for r in points], color=line.get_color(), alpha=0.15
            )
        axis.set_ylabel(points[0]["unit"])
    if not by_provider:
        return False
    positive = all(r["p20"] > 0 for group in by_provider.values() for r in group)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log" if positive else "linear")  # a tiny kernel's memory can be 0
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")
    return True


def render(source, out_dir=None) -> List[Path]:
    """One PNG per (device, kernel, sweep) of the CSV(s) at ``source``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        figure, axes = plt.subplots(
            len(metrics), len(modes), figsize=(5.5 * len(modes), 4 * len(metrics)), squeeze=False
        )
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
        plt.close(figure)
        written.append(path)
    return written
