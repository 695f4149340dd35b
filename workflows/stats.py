"""Statistics of the evaluation and of the judge's agreement with people (pure: numpy and the
standard library only); shared by the evaluate and preference stages.

- ``wilson(k, n)``: a rate with its Wilson score interval (good at small n and near 0 or 1);
- ``mcnemar_exact(b, c)``: two-sided exact McNemar p-value for paired before/after changes
  (``b`` prompts changed one way, ``c`` the other; the concordant ones carry no information);
- ``paired_change(before, after)``: the mean paired change per prompt with a bootstrap interval
  (resampling prompts) and McNemar's p;
- ``bootstrap_mean(values)``: a percentile bootstrap interval for a mean over prompts (win rates:
  1 win, 0.5 tie, 0 loss per prompt);
- ``min_detectable_difference(n)``: the smallest change in a rate that ``n`` paired prompts can
  detect (two-sided α = 0.05, power 0.8, at the rate of most variance unless given);
- ``length_controlled_win_rate(scores, length_diffs)``: the win rate with answer length taken
  out — a logistic regression of the per-prompt outcome on the length difference, read at a
  difference of zero (the idea behind AlpacaEval's length-controlled win rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval."""

    value: float
    lo: float
    hi: float

    def excludes(self, x: float) -> bool:
        return self.lo > x or self.hi < x

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """``k`` of ``n`` with the Wilson score interval; n = 0 gives NaN in [0, 1]."""
    if n <= 0:
        return Interval(math.nan, 0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} outside 0..n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under no change, the ``b + c`` discordant prompts split
    like fair coin flips; p = P(a split at least as uneven), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Mean of per-prompt ``values`` with a percentile bootstrap interval (prompts resampled)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(lo), float(hi))


@dataclass(frozen=True)
class PairedChange:
    """``after - before`` per prompt for a 0/1 outcome (e.g. harmful compliance), averaged."""

    before: Interval  # rate before (Wilson)
    after: Interval  # rate after (Wilson)
    change: Interval  # mean of after - before, bootstrap interval over prompts
    up: int  # prompts 0 → 1
    down: int  # prompts 1 → 0
    p_value: float  # exact McNemar on (up, down)

    def as_dict(self) -> dict:
        return {"before": self.before.as_dict(), "after": self.after.as_dict(), "change": self.change.as_dict(),
                "up": self.up, "down": self.down, "p_value": self.p_value}


def paired_change(before, after, n_boot: int = 2000, seed: int = 0) -> PairedChange:
    """Paired 0/1 outcomes of the same prompts under two models."""
    b, a = np.asarray(before, dtype=int), np.asarray(after, dtype=int)
    if b.shape != a.shape:
        raise ValueError(f"paired_change: {b.size} outcomes before but {a.size} after — pair them by prompt")
    up, down = int(((b == 0) & (a == 1)).sum()), int(((b == 1) & (a == 0)).sum())
    return PairedChange(wilson(int(b.sum()), b.size), wilson(int(a.sum()), a.size),
                        bootstrap_mean(a - b, n_boot, seed), up, down, mcnemar_exact(up, down))


def min_detectable_difference(n: int, rate: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference between two rates near ``rate`` that ``n`` prompts per side detect
    with the given power (normal approximation, two-sided)."""
    if n <= 0:
        return math.inf
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt(2 * rate * (1 - rate) / n)


def length_controlled_win_rate(scores, length_diffs, iters: int = 50) -> float:
    """P(win) at equal length: fit ``score ~ sigmoid(a + b · d)`` by Newton's method, where
    ``score`` is 1 (win), 0.5 (tie) or 0 (loss) per prompt and ``d`` the length difference
    (model minus base, in standard deviations), and return ``sigmoid(a)``."""
    y = np.asarray(scores, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    if y.size == 0:
        return math.nan
    sd = d.std()
    x = np.stack([np.ones_like(d), d / sd if sd > 0 else np.zeros_like(d)], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (y - p)
        hess = x.T @ (x * (p * (1 - p) + 1e-9)[:, None]) + 1e-6 * np.eye(2)  # tiny ridge: separable data
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))
