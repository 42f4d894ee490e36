"""Paired comparisons over seeds: the difference of each run to the reference run of the same seed (same
warm start, same prompts), its mean with a 95% Student-t interval, and sign counts.

The t quantile is computed here (no SciPy dependency): the Student-t density integrated with Simpson's
rule and inverted by bisection, accurate to about 1e-6 for the degrees of freedom a study has.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

SIMPSON_INTERVALS = 4000  # even; the density is smooth, so this is far below the printed precision


def student_t_pdf(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for T ~ Student t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df}")
    if x < 0:
        return 1.0 - student_t_cdf(-x, df)
    h = x / SIMPSON_INTERVALS
    total = student_t_pdf(0.0, df) + student_t_pdf(x, df)
    for i in range(1, SIMPSON_INTERVALS):
        total += (4 if i % 2 else 2) * student_t_pdf(i * h, df)
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student t with ``df`` degrees of freedom, by bisection."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"p: expected a probability in (0.5, 1), got {p}")
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


class Paired(NamedTuple):
    """Summary of paired differences d_i (one per seed)."""

    n: int
    mean: float
    low: float  # 95% t interval; nan when n < 2
    high: float
    positive: int  # seeds with d > 0
    negative: int  # seeds with d < 0

    def cell(self) -> str:
        """``+0.021 [-0.010, +0.052] 4+/1-`` (n = 1: no interval; n = 0: "-")."""
        if self.n == 0:
            return "-"
        interval = f" [{self.low:+.3f}, {self.high:+.3f}]" if self.n > 1 else ""
        return f"{self.mean:+.3f}{interval} {self.positive}+/{self.negative}-"

    def excludes_zero(self) -> Optional[bool]:
        """True when the interval lies on one side of 0; None without an interval."""
        if self.n < 2:
            return None
        return self.low > 0 or self.high < 0


def paired(differences: Sequence[float], confidence: float = 0.95) -> Paired:
    """Mean, t interval and sign counts of ``differences`` (NaN entries are left out)."""
    values = [d for d in differences if not math.isnan(d)]
    n = len(values)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, 0, 0)
    mean = sum(values) / n
    low = high = math.nan
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return Paired(n, mean, low, high, sum(v > 0 for v in values), sum(v < 0 for v in values))
