"""The curvature the closed-form alpha weighs tasks by: the paper's diagonal Fisher, or that Fisher set to scale by
the task's own measured loss profile.

Why a second estimate: the diagonal Fisher at theta*_t is a mean squared gradient taken where the task's training
loss is already small, so its SCALE says how well the LoRA fits, not how much shrinking it costs. Measured on
nouns (BENCHMARKS.md, the quadratic check) it predicted 17x to 48,000x less loss increase than a merge caused,
with a 30x spread between tasks the merge hurt about equally; alpha_t is a ratio of the tasks' Fishers, so the
task fit best got alpha ~ 0. `profile` keeps F_t's shape across weights (where the task is sensitive) and sets
its scale from the task's own loss along its step, measured at the end of task t on its training samples
(exemplar-free):

    L_t(s) = L_t(W_hat_{t-1} + s Delta_t) at s in PROFILE_POINTS,
    c_t = argmin_c sum_s (L_t(s) - L_t(1) - c/2 (1 - s)^2)^2     (the quadratic model's own form at theta*_t),
    F_t <- k_t F_t with k_t = c_t / (Delta_t^T F_t Delta_t),

so the quadratic model the closed form minimises predicts task t's measured cost of shrinking its step exactly.
The closed form itself is unchanged (recurrence.py), and so is everything downstream of the Fisher: the scaled
Fisher is what the accumulators, `--keep-fisher` and `pmserve merge --method pm` see. c_t = 0 says the merged
model already fits task t (its loss does not rise as its step shrinks): the task then asks for no weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..adapters import Tensors

CURVATURES = ("profile", "fisher")
PROFILE_POINTS = (0.0, 0.5, 1.0)  # s along the step; 1 (theta*_t) is the reference


def profile_curvature(points: Sequence[float], losses: Sequence[float]) -> float:
    """c >= 0, the least-squares curvature of L(s) - L(1) ~ c/2 (1 - s)^2 over the points other than s = 1."""
    ref = dict(zip(points, losses))[1.0]
    num = den = 0.0
    for s, loss in zip(points, losses):
        q = 0.5 * (1.0 - s) ** 2
        num += q * (loss - ref)
        den += q * q
    return max(num / den, 0.0) if den > 0 else 0.0


def quadratic_form(fisher: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]) -> float:
    """step^T F step over every module: the Fisher's own prediction of the curvature along `step`."""
    return sum(float(torch.sum(fisher[k].double() * step[k].double() ** 2)) for k in step)


def rescale(
    fisher: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor], curvature: float
) -> tuple[Tensors, float]:
    """(k F, k) with k step^T F step = `curvature` (k = 0 for a Fisher that sees nothing along the step)."""
    predicted = quadratic_form(fisher, step)
    k = curvature / predicted if predicted > 0 else 0.0
    return {name: f * k for name, f in fisher.items()}, k
