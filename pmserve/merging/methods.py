"""The merge methods behind one interface: the registry the CLI, the plan and the report know methods through.

P&M and the running average are sequential (an alpha_t per task, the recurrence in recurrence.py); the peer
methods combine the task vectors with per-task weights, TIES and DARE composed from one sparsify-then-combine
function (combine_task_vectors, with TIES' consensus as running sums: Consensus) equal to PEFT's merge_utils on the
same task vectors and random state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    task_vectors: Iterable[torch.Tensor], weights: torch.Tensor, method: MergeMethod, density: float
) -> torch.Tensor:
    """One module's merged delta under a weighted method, one task vector at a time (T never held at once).

    Sparsify each task vector with PEFT's own prune, in order (magnitude: keep the top `density` fraction by
    |value|; random: keep each value with probability `density` and divide by it), weight them, then either sum
    or, with consensus, keep per element only the values agreeing with the sign of the sparsified vectors' sum
    and average them (Consensus). Equal to peft.utils.merge_utils.{task_arithmetic, ties, dare_linear,
    dare_ties} with the same random state: the masks are drawn in PEFT's order, by PEFT's code or (dare_prune) an
    equal and faster one.
    """
    from peft.utils import merge_utils as mu

    merged = consensus = None
    drawn = Scratch()  # DARE's draws, one task vector after another
    for x, w in zip(task_vectors, weights.tolist()):
        if method.sparsify == "random" and density < 1.0:
            x = dare_prune(x, density, out=drawn.get(x.shape))
        elif method.sparsify == "magnitude" and density < 1.0:
            x = mu.prune(x, density, method="magnitude")
        if method.consensus:
            consensus = consensus or Consensus()
            consensus.add(x.unsqueeze(0), torch.tensor([w], dtype=x.dtype))
            shape = x.shape
        else:
            merged = x * w if merged is None else merged.add_(x, alpha=w)
    return consensus.result(shape) if method.consensus else merged


def dare_prune(x: torch.Tensor, density: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE's pruning as PEFT's merge_utils.random_pruning(x, density, rescale=True) does it, to the bit, from the
    same state of torch's global generator, and about 2.5x faster on the CPU.

    PEFT keeps x where torch.bernoulli(full_like(x, density)) draws 1. For a contiguous float32 x on the CPU,
    bernoulli draws one float uniform u per value from the generator, in order, and gives 1 where u < density:
    torch.rand draws the same u without bernoulli's per-value cost (3 against 14 ns a value, measured here), into
    `out` if given (a reused buffer spares the page faults of a fresh one). Other dtypes, layouts and devices take
    PEFT's own call."""
    from peft.utils import merge_utils as mu

    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return mu.prune(x, density, method="random", rescale=True)
    keep = torch.rand(x.shape, dtype=torch.float32, out=out).lt_(density)  # 1.0 where u < density, else 0.0
    return keep.mul_(x).div_(density)  # PEFT's (x * mask) / density


class Scratch:
    """A reused buffer for block-sized temporaries: a fresh block-sized tensor per block costs its page faults,
    which on a VM can cost more than the arithmetic done in it."""

    def __init__(self):
        self.buffer = torch.empty(0)

    def get(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of `shape` in the buffer (valid until the next get)."""
        n = math.prod(shape)
        if self.buffer.numel() < n or self.buffer.dtype != dtype:
            self.buffer = torch.empty(n, dtype=dtype)
        return self.buffer[:n].view(shape)


class Consensus:
    """TIES' sign election and disjoint mean (peft's calculate_majority_sign_mask("total") + disjoint_merge) from
    running sums over the tasks, so that the tasks can come one at a time or in blocks.

    With the sparsified values x_t, the elected sign is that of S = sum_t x_t; the agreeing values are the
    positive ones where S >= 0 and the negative ones elsewhere; the merge is (sum of w_t x_t over them) / (their
    count). So five sums over t suffice: S, sum w_t max(x_t, 0), sum w_t x_t, and the counts of positive and of
    negative values (as sum sign(x_t) and sum max(sign(x_t), 0)), each a matrix-vector product over a block.
    One Consensus can merge block after block: `result` ends a block, and its buffers serve the next.
    """

    def __init__(self):
        self.sums: torch.Tensor | None = None  # 5 x values: the five sums below, one row each
        self._sums, self._part = Scratch(), Scratch()

    def add(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Add the tasks of x (tasks x ...), weighted by `weights` (one per task)."""
        flat = x.reshape(len(weights), -1)
        if self.sums is None:
            self.sums = self._sums.get((5, flat.shape[1]), flat.dtype).zero_()
        total, pos_w, all_w, net_n, pos_n = self.sums
        w, ones = weights.to(flat.dtype), torch.ones(len(weights), dtype=flat.dtype)
        _accumulate(total, flat, ones)
        _accumulate(all_w, flat, w)
        part = torch.clamp(flat, min=0, out=self._part.get(flat.shape, flat.dtype))  # the positive parts
        _accumulate(pos_w, part, w)
        _accumulate(net_n, torch.sign(flat, out=part), ones)  # then the signs
        _accumulate(pos_n, part.clamp_(min=0), ones)

    def result(self, shape, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged values, into `out` if given, else into the sums' buffer (valid until the next add); uses
        up the sums (computed in place: at a block's size, the temporaries of the plain expression cost more
        than the arithmetic)."""
        total, pos_w, all_w, net_n, pos_n = self.sums
        neg_w, neg_n = all_w.sub_(pos_w), net_n.neg_().add_(pos_n)  # sums over the negative values
        pos_w.div_(pos_n.clamp_(min=1))
        neg_w.div_(neg_n.clamp_(min=1))
        self.sums = None
        # where(total >= 0, pos_w, neg_w) as pos_w * h + neg_w * (1 - h) with h = [total >= 0] in {0, 1}: exact
        # (a product with 0 or 1 and a sum with 0 round nothing), and float arithmetic only: torch's where and
        # bool masks are not vectorised on the CPU (about 25x a subtraction's time a value)
        h = torch.sign(total, out=pos_n).add_(1).clamp_(max=1)  # in the counts' rows, which are done with
        not_h = torch.neg(h, out=neg_n).add_(1)
        merged = torch.mul(pos_w, h, out=pos_w if out is None else out.view(-1))
        return merged.addcmul_(neg_w, not_h).view(shape)


def _accumulate(total: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> None:
    """total += weights @ x (x: tasks x values): a matrix-vector product, or for one task (DARE's task vectors
    come one at a time) a scaled add, which costs 0.65 of the product on a weight-sized x."""
    if len(weights) == 1:
        total.add_(x[0], alpha=float(weights[0]))
    else:
        total.addmv_(x.T, weights)
