"""Continual-learning metrics over the accuracy matrix acc[i][j] (after task i, on task j's test set, j <= i)."""

from __future__ import annotations


def average_accuracy(acc: list[list[float]]) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    return sum(acc[-1]) / len(acc[-1])


def average_anytime_accuracy(acc: list[list[float]]) -> float:
    """AAA: the mean over training steps i of the mean accuracy on tasks 0..i."""
    return sum(sum(row[: i + 1]) / (i + 1) for i, row in enumerate(acc)) / len(acc)


def forgetting(acc: list[list[float]]) -> float:
    """Mean over tasks j < T of the best earlier accuracy on j minus the final accuracy on j (0 for one task)."""
    T = len(acc)
    if T < 2:
        return 0.0
    drops = [max(acc[i][j] for i in range(j, T - 1)) - acc[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def summary(acc: list[list[float]]) -> dict[str, float]:
    return {"ACC": average_accuracy(acc), "AAA": average_anytime_accuracy(acc), "forgetting": forgetting(acc)}
