"""The merge methods behind one interface: the registry the CLI, the plan and the report know methods through.

P&M and the running average are sequential (an alpha_t per task, the recurrence in recurrence.py); the peer
methods combine the task vectors with per-task weights, TIES and DARE composed from one sparsify-then-combine
function (combine_task_vectors) equal to PEFT's merge_utils on the same task vectors and random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergeMethod:
    """One way to merge task vectors; the CLI and the report know methods only through MERGE_METHODS.

    `sequential` methods run the convex merge task after task with an alpha_t per task (the adapters' kinds
    decide theta*_t); the others combine the task vectors Delta_t with per-task weights, optionally sparsified
    to --density (`magnitude`: TIES, `random`: DARE, rescaled) and with TIES' sign consensus.
    """

    name: str
    help: str
    sequential: bool = False
    normalise: bool = False
    sparsify: str | None = None
    consensus: bool = False

    @property
    def linear(self) -> bool:
        """The result is sum_t c_t Delta_t, so an adapter of concatenated task LoRAs reproduces it exactly."""
        return self.sparsify is None and not self.consensus

    @property
    def uses_weights(self) -> bool:
        return not self.sequential

    @property
    def uses_density(self) -> bool:
        return self.sparsify is not None


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "pm",
            "closed-form P&M alphas from the Fisher files (identity Hessian without them)",
            sequential=True,
        ),
        MergeMethod(
            "avg",
            "alpha_t = 1/t: the running average (the plain average of independent adapters)",
            sequential=True,
        ),
        MergeMethod(
            "linear", "weighted average of the task vectors (weights normalised to sum 1)", normalise=True
        ),
        MergeMethod("task-arithmetic", "weighted sum of the task vectors (PEFT task_arithmetic)"),
        MergeMethod(
            "ties",
            "TIES: magnitude pruning, sign election, disjoint mean (PEFT ties)",
            sparsify="magnitude",
            consensus=True,
        ),
        MergeMethod(
            "dare-linear",
            "DARE: random pruning with rescaling, weighted sum (PEFT dare_linear)",
            sparsify="random",
        ),
        MergeMethod(
            "dare-ties",
            "DARE pruning + TIES sign consensus (PEFT dare_ties)",
            sparsify="random",
            consensus=True,
        ),
    )
}


def combine_task_vectors(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, method: MergeMethod, density: float
) -> torch.Tensor:
    """One module's merged delta under a weighted method, composed from PEFT's merge_utils.

    Sparsify each task vector (magnitude: keep the top `density` fraction by |value|; random: keep each value
    with probability `density` and divide by it), weight them, then either sum or, with consensus, keep per
    element only the values agreeing with the weighted-sum sign of the sparsified vectors and average them.
    Equal to peft.utils.merge_utils.{task_arithmetic, ties, dare_linear, dare_ties} with the same random state.
    """
    from peft.utils import merge_utils as mu

    if method.sparsify and density < 1.0:
        rescale = method.sparsify == "random"
        task_tensors = [mu.prune(t, density, method=method.sparsify, rescale=rescale) for t in task_tensors]
    stacked = torch.stack(task_tensors, dim=0)
    weighted = stacked * mu.reshape_weight_task_tensors(stacked, weights.to(stacked.dtype))
    if method.consensus:
        return mu.disjoint_merge(weighted, mu.calculate_majority_sign_mask(stacked, method="total"))
    return weighted.sum(dim=0)
