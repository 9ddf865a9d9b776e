"""Continual-learning metrics over the accuracy matrix acc[i][j] (after task i, on task j's test set, j <= i).

An entry is None where task j's test set was not reachable after task i (a RUN kept no copy and its data is
gone): the means are taken over the entries measured, never counting a missing one as 0.
"""

from __future__ import annotations


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
