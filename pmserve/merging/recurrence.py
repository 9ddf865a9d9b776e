"""The P&M recurrence, written once: theta*_t, the step, the closed-form alpha_t and D_t = D_{t-1} + alpha_t step.

Pure functions; no files, no models. `pmserve train` calls them after every task on weight tensors, and
`pmserve merge` calls the same ones on the coefficients of the task vectors (a D that is sum_j d_j Delta_j is
the vector d), so both give the same alphas. The only form-specific piece is how the closed form's sums are
taken: over every element of every module (alpha_terms, with the constant-memory accumulators below), or from
the Fisher-weighted Gram matrices of the task vectors (gram_alphas, for streaming merges).

A sequence has two kinds of task. chained (what `pmserve train` writes): task t was trained on W_hat_{t-1}, so
theta*_t = W_hat_{t-1} + Delta_t; independent (any adapter trained from the base): theta*_t = W_0 + Delta_t.
Both follow W_hat_t = (1 - alpha_t) W_hat_{t-1} + alpha_t theta*_t, i.e. D_t = D_{t-1} + alpha_t (theta*_t -
W_hat_{t-1}).

All weights are kept relative to the pretrained W_0: `merged` is D_{t-1} = W_hat_{t-1} - W_0 and theta*_i is
stored as theta*_i - W_0. With diagonal Fishers F_i the objective's sums need only two accumulators
(PM_METHOD.md, "constant memory in T"):
    S_F = sum_i F_i,   S_Ft = sum_i F_i * (theta*_i - W_0)
    alpha_t = -sum((D_{t-1} * S_F - S_Ft) * Delta_t) / sum(S_F * Delta_t^2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..adapters import Tensors

KINDS = ("chained", "independent")


def theta_star(kind: str, prev: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """theta*_t - W_0 from D_{t-1} (None for D_0 = 0) and Delta_t: D_{t-1} + Delta_t if chained, else Delta_t."""
    return prev + delta if kind == "chained" and prev is not None else delta


def step_of(kind: str, prev: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """theta*_t - W_hat_{t-1}, the direction alpha_t scales: Delta_t if chained, else Delta_t - D_{t-1}."""
    return delta if kind == "chained" or prev is None else delta - prev


def merge_step(prev: torch.Tensor | None, step: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_t = D_{t-1} + alpha_t * step (D_0 = 0 as None)."""
    return alpha * step if prev is None else prev + alpha * step


def sequence_step(prev: torch.Tensor | None, delta: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """D_t from D_{t-1} and Delta_t: W_hat_t = (1 - alpha_t) W_hat_{t-1} + alpha_t theta*_t."""
    return merge_step(prev, step_of(kind, prev, delta), alpha)


def effective_coefficients(kinds: list[str], alphas: list[float]) -> list[float]:
    """c_t with D_T = sum_t c_t Delta_t: the recurrence on the task vectors' coefficients (Delta_t = e_t)."""
    d = None
    for t, (kind, a) in enumerate(zip(kinds, alphas)):
        d = sequence_step(d, _unit(len(kinds), t), a, kind)
    return [] if d is None else d.tolist()


def _unit(n: int, t: int) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[t] = 1.0
    return e


@dataclass
class FisherSums:
    """The running S_F and S_Ft over tasks seen so far (weight-sized, constant in the number of tasks)."""

    S_F: Tensors = field(default_factory=dict)
    S_Ft: Tensors = field(default_factory=dict)

    def add(self, fisher: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> None:
        """Add task i: its diagonal Fisher F_i and its optimum theta*_i - W_0."""
        for k, f in fisher.items():
            f = f.float()
            ft = f * theta[k].float()
            if k in self.S_F:
                self.S_F[k] += f
                self.S_Ft[k] += ft
            else:
                self.S_F[k], self.S_Ft[k] = f.clone(), ft

    def state(self) -> Tensors:
        return {
            **{f"S_F.{k}": v for k, v in self.S_F.items()},
            **{f"S_Ft.{k}": v for k, v in self.S_Ft.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> FisherSums:
        sums = cls()
        for k, v in state.items():
            head, _, name = k.partition(".")
            (sums.S_F if head == "S_F" else sums.S_Ft)[name] = v.float()
        return sums


def alpha_terms(
    merged: torch.Tensor, delta: torch.Tensor, S_F: torch.Tensor, S_Ft: torch.Tensor
) -> tuple[float, float]:
    """One module's share of the numerator and denominator of alpha_t (S_F, S_Ft already include task t);
    `delta` is the step (Delta_t for a chained task)."""
    merged, delta = merged.float(), delta.float()
    num = -torch.sum((merged * S_F - S_Ft) * delta)
    den = torch.sum(S_F * delta * delta)
    return float(num), float(den)


def closed_form_alpha(terms: Iterable[tuple[float, float]], clip: bool = True) -> float:
    """The global alpha_t = sum(num) / sum(den) over every adapted module, clipped to [0, 1] by default."""
    num = den = 0.0
    for n, d in terms:
        num += n
        den += d
    if den <= 0.0:  # a zero task vector or a zero Fisher: nothing to merge, keep the old model
        return 0.0
    a = num / den
    return min(max(a, 0.0), 1.0) if clip else a


def task_alpha(
    method: str,
    t: int,
    merged: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    sums: FisherSums | None = None,
    clip: bool = True,
) -> float:
    """alpha_t for task t (1-based) under `method`: seq 1, avg 1/t, merge and pm the closed form.

    For merge and pm, `sums` must already include task t's Fisher and optimum; alpha_1 = 1 follows from the
    formula (D_0 = 0 gives num = den) and is returned exactly.
    """
    if method == "seq":
        return 1.0
    if method == "avg":
        return 1.0 / t
    if method in ("pm", "merge"):
        if t == 1:
            return 1.0
        if sums is None:
            raise ValueError("the closed-form alpha needs Fisher sums")
        return closed_form_alpha(
            (alpha_terms(merged[k], delta[k], sums.S_F[k], sums.S_Ft[k]) for k in delta), clip=clip
        )
    raise ValueError(f"no merge coefficient for method {method!r}")


def chained_merge(
    merged: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], alpha: float
) -> Tensors:
    """D_t of a chained task, module by module (what `pmserve train` does after every task)."""
    return {k: sequence_step(merged.get(k), d, alpha, "chained") for k, d in delta.items()}


def chained_theta(merged: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Tensors:
    """theta*_t - W_0 of a chained task, module by module: what its Fisher is weighted against."""
    return {k: theta_star("chained", merged.get(k), d) for k, d in delta.items()}


def gram_alphas(kinds: list[str], grams: list[torch.Tensor], clip: bool) -> list[float]:
    """The closed-form alphas from the Gram matrices H^1..H^t (t = len(grams)), replaying the recurrence above.

    Every quantity of the closed form is a combination of the task vectors: D_{t-1} = sum_j d_j Delta_j,
    theta*_i - W_0 = Delta_i (+ D_{i-1} when chained), the step s = Delta_t (- D_{t-1} when independent). So with
    S_F = sum_{k<=t} F_k and S_Ft = sum_{k<=t} F_k theta*_k,
        num = -sum((D S_F - S_Ft) * s) = -sum_{k<=t} (d - theta_k)^T H^k s,   den = sum_{k<=t} s^T H^k s,
    exactly the sums alpha_terms takes over every element of every module.
    """
    n = len(kinds)
    d = None  # D_{t-1} as coefficients of the task vectors
    thetas, alphas = [], []
    for t in range(len(grams)):
        e = _unit(n, t)
        thetas.append(theta_star(kinds[t], d, e))
        s = step_of(kinds[t], d, e)
        if t == 0:
            alphas.append(task_alpha("pm", 1, {}, {}))
        else:
            num = -sum(float((d - thetas[k]) @ grams[k] @ s) for k in range(t + 1))
            den = sum(float(s @ grams[k] @ s) for k in range(t + 1))
            alphas.append(closed_form_alpha([(num, den)], clip=clip))
        d = merge_step(d, s, alphas[-1])
    return alphas
