"""Merging task vectors: the closed-form P&M coefficient and the convex merge W_t = W_{t-1} + alpha_t Delta_t.

Pure tensor functions over dicts {module name: tensor}; no files, no models. `pmserve train` calls these after
every task and `pmserve merge` calls the same ones over adapter files, so both give the same alphas.

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

Tensors = dict[str, torch.Tensor]

METHODS = ("pm", "merge", "seq", "avg", "frozen")


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The task vector of one adapted matrix: the low-rank product scaling * B @ A, in fp32."""
    return scaling * (lora_B.float() @ lora_A.float())


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
    """One module's share of the numerator and denominator of alpha_t (S_F, S_Ft already include task t)."""
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


def merge_step(
    merged: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], alpha: float
) -> Tensors:
    """W_hat_t - W_0 = (W_hat_{t-1} - W_0) + alpha_t Delta_t, module by module."""
    out = {}
    for k, d in delta.items():
        prev = merged.get(k)
        out[k] = alpha * d.float() if prev is None else prev.float() + alpha * d.float()
    return out
