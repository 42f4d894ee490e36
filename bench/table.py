"""Markdown tables of benchmark CSVs: per kernel, sizes and mode, each provider's p50, its time over the
roofline and over calibrl's, and its peak memory; the train step's tokens/s against eager.

    python -m bench.table bench/results/cpu-2core/ [--out tables.md] [--plots]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .harness import read_rows


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _order(provider: str) -> tuple:
    return (not provider.startswith("calibrl"), provider == "roofline", provider)


def render(source) -> str:
    rows = read_rows(source)
    cells = defaultdict(dict)  # (kernel, x_name, mode, x) -> {(provider, metric): p50}
    for row in rows:
        cells[(row["kernel"], row["x_name"], row["mode"], row["x"])][(row["provider"], row["metric"])] = row["p50"]
    stamps = sorted({row["timestamp"] for row in rows})
    lines = [
        f"Measured on {', '.join(sorted({r['device'] for r in rows}))}; version "
        f"{', '.join(sorted({r['version'] for r in rows}))}; runs {stamps[0] if stamps else '-'}"
        f"{' .. ' + stamps[-1] if len(stamps) > 1 else ''}.",
        "",
    ]
    for (kernel, x_name, mode, x), at in sorted(cells.items()):
        providers = sorted({p for p, _ in at}, key=_order)
        if kernel == "train_step":
            eager = at.get(("eager", "speed"), math.nan)
            lines += [
                f"**{kernel}, {x_name.split(';')[0]}={x:g}; {x_name.partition('; ')[2]}**",
                "",
                "| provider | tokens/s p50 | / eager | peak (MiB) |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {p} | {_fmt(at.get((p, 'speed'), math.nan))} | "
                f"{_fmt(at.get((p, 'speed'), math.nan) / eager)} | {_fmt(at.get((p, 'memory'), math.nan))} |"
                for p in providers
            ]
        else:
            floor, mine = at.get(("roofline", "speed"), math.nan), at.get(("calibrl", "speed"), math.nan)
            lines += [
                f"**{kernel}, {mode}, {x_name.split(';')[0]}={x:g}; {x_name.partition('; ')[2]}**",
                "",
                "| provider | ms p50 | / roofline | / calibrl | peak above inputs (MiB) |",
                "|---|---|---|---|---|",
            ]
            for p in providers:
                time, memory = at.get((p, "speed"), math.nan), at.get((p, "memory"), math.nan)
                lines.append(f"| {p} | {_fmt(time)} | {_fmt(time / floor)} | {_fmt(time / mine)} | {_fmt(memory)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a results folder or CSV")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--plots", action="store_true", help="also render the PNGs (bench.plot) beside the CSVs")
    args = parser.parse_args(argv)
    if args.plots:
        from . import plot

        for path in plot.render(args.source):
            print(f"plot: {path}")
    text = render(args.source)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
