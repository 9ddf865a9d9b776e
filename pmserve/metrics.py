"""Continual-learning metrics over the accuracy matrix acc[i][j] (after task i, on task j's test set, j <= i).

An entry is None where task j's test set was not reachable after task i (a RUN kept no copy and its data is
gone): the means are taken over the entries measured, never counting a missing one as 0.
"""

from __future__ import annotations

import math


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def average_accuracy(acc: list[list[float | None]]) -> float | None:
    """ACC: mean accuracy over all tasks after the last one."""
    return _mean(acc[-1])


def average_anytime_accuracy(acc: list[list[float | None]]) -> float | None:
    """AAA: the mean over training steps i of the mean accuracy on tasks 0..i."""
    return _mean(_mean(row[: i + 1]) for i, row in enumerate(acc))


def forgetting(acc: list[list[float | None]]) -> float | None:
    """Mean over tasks j < T of the best earlier accuracy on j minus the final accuracy on j (0 for one task)."""
    T = len(acc)
    if T < 2:
        return 0.0
    drops = []
    for j in range(T - 1):
        earlier = [acc[i][j] for i in range(j, T - 1) if acc[i][j] is not None]
        if earlier and acc[T - 1][j] is not None:
            drops.append(max(earlier) - acc[T - 1][j])
    return _mean(drops)


def summary(acc: list[list[float]]) -> dict[str, float]:
    return {"ACC": average_accuracy(acc), "AAA": average_anytime_accuracy(acc), "forgetting": forgetting(acc)}


# ---------------------------------------------------------------- paired comparisons over seeds


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, computed (scipy is not a dependency):
    bisection on the CDF 1/2 + integral_0^x of the density, the integral by Simpson's rule on 4000 intervals."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        n, h = 4000, x / 4000
        f = [c * (1 + (k * h) ** 2 / df) ** (-(df + 1) / 2) for k in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed differences and its two-sided t interval, mean -+
    t_{(1+level)/2, n-1} sd / sqrt(n); one difference gives an unbounded interval (nothing to estimate it by)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
