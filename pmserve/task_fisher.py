"""A task's diagonal Fisher from its training data, for adapters that came without one.

`pmserve train` takes each task's Fisher right after training, with the run's own training head
(Learner._fisher). A PEFT adapter trained elsewhere has neither a Fisher nor a pmserve head, so
`pmserve merge --data` rebuilds the model at theta*_t, fits a classifier on that model's own training features
(class-mean prototypes with cosine logits at the training cosine scale: it needs no training and its cross-entropy
is well defined), and takes the same Fisher as training: fisher.diagonal_fisher of the cross-entropy over the
task's classes, summed over the batch, with labels drawn from the model (or the true ones), on up to `samples`
training examples drawn with the generator training draws them with. The Fisher is of the full adapted weights,
so it does not matter whether the model holds W_0 + Delta as plain weights (here) or as a LoRA-wrapped layer
(training): the gradient w.r.t. W is the same.

`task_fisher` is the one implementation: Learner._fisher calls it with its linear/cosine head's logits,
merging.data_fisher.DataFisher with prototype logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .adapters import Tensors, match_module
from .backbone import Encoder, Preprocessor, split_batches
from .defaults import TRAIN_COSINE_SCALE
from .errors import PMError
from .fisher import diagonal_fisher
from .heads import Prototypes
from .seeds import FISHER, stream_generator
from .tasks import Split

FISHER_LABELS = ("sampled", "true")


def check_fisher_labels(labels: str) -> None:
    """--fisher-labels, for train and merge alike: sampled (the true Fisher) or true (the empirical one)."""
    if labels not in FISHER_LABELS:
        raise PMError(f"--fisher-labels: must be true or sampled, got {labels!r}")


def fisher_generator(seed: int, task: int) -> torch.Generator:
    """The generator task `task`'s Fisher samples and sampled labels are drawn from, in training and merge."""
    return stream_generator(seed, task, FISHER)


def fisher_order(split: Split, samples: int, generator: torch.Generator) -> torch.Tensor:
    """The examples a task's Fisher is taken on: `samples` drawn at random, then sorted by length so that its
    batches pad little (the Fisher is a sum over the samples: their order does not change it)."""
    order = torch.randperm(len(split.labels), generator=generator)[:samples]
    lengths = [len(split.inputs[j]) if isinstance(split.inputs[j], str) else 0 for j in order.tolist()]
    return order[torch.argsort(torch.tensor(lengths), stable=True)]


def task_fisher(
    encoder: Encoder,
    prep: Preprocessor,
    layers: Mapping[str, nn.Module],
    split: Split,
    classes: list[str],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    sample_labels: torch.Generator | None = None,
) -> Tensors:
    """The diagonal Fisher of cross-entropy over `classes` (logits_fn(features) has one column per class) on the
    samples `order` of `split`, w.r.t. each layer's full weight. True labels, or with `sample_labels` labels drawn
    from the model's own softmax (the true Fisher's estimator).

    The batches are the global ones of one process; on several ranks each takes its slice (distributed.shard),
    and sampled labels are drawn for the whole global batch (Exp(1) draws q, label argmax p / q, a draw from p),
    so neither the samples nor the labels depend on the number of ranks.
    """
    target_of = {y: k for k, y in enumerate(classes)}

    def loss_fn(batch, targets):
        logits = logits_fn(encoder(**batch))
        if sample_labels is not None:  # targets are the Exp(1) draws q
            probs = torch.softmax(logits.detach().float().cpu(), -1)
            targets = (probs / targets).argmax(1).to(logits.device)
        return F.cross_entropy(logits, targets, reduction="sum")

    def batches():
        for k in range(0, len(order), batch_size):
            glob = order[k : k + batch_size]
            rows = distributed.shard(len(glob))
            if sample_labels is not None:
                q = torch.empty(len(glob), len(classes)).exponential_(1, generator=sample_labels)
            part = glob[rows]
            if len(part):
                batch, labels = next(split_batches(prep, split, part, len(part), device))
                ys = torch.tensor([target_of[y] for y in labels], device=device)
                yield batch, q[rows] if sample_labels is not None else ys

    return diagonal_fisher(dict(layers), batches(), loss_fn)


@torch.no_grad()
def loss_profile(
    encoder: Encoder,
    prep: Preprocessor,
    split: Split,
    classes: list[str],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    at: Callable[[float], AbstractContextManager],
    points: Sequence[float],
) -> list[float]:
    """A task's loss profile (merging.curvature): for each s of `points`, inside `at(s)` (the model moved to
    W_hat_{t-1} + s Delta_t), the mean cross-entropy over `classes` at the true labels on the samples `order` of
    `split`. Each rank takes its slice of every global batch and the sums are summed over the ranks, so every
    rank gets the single-process values."""
    target_of = {y: k for k, y in enumerate(classes)}
    losses = []
    for s in points:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with at(s):
            for k in range(0, len(order), batch_size):
                glob = order[k : k + batch_size]
                part = glob[distributed.shard(len(glob))]
                if len(part):
                    batch, labels = next(split_batches(prep, split, part, len(part), device))
                    ys = torch.tensor([target_of[y] for y in labels], device=device)
                    logits = logits_fn(encoder(**batch)).float()
                    total[0] += F.cross_entropy(logits, ys, reduction="sum").double()
                    total[1] += len(part)
        distributed.all_reduce_sum(total)
        losses.append(float(total[0] / total[1].clamp_min(1)))
    return losses


def prototype_logits(
    feats: torch.Tensor, labels: list[str], classes: list[str], scale: float = TRAIN_COSINE_SCALE
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cosine logits to the class means of `feats` (heads.Prototypes), times `scale`, one column per class."""
    protos = Prototypes(feats.shape[1])
    protos.update(feats, labels)
    pos = {y: i for i, y in enumerate(protos.labels)}
    means = F.normalize(protos.means()[[pos[y] for y in classes]].float(), dim=-1).to(feats.device)

    def logits(f: torch.Tensor) -> torch.Tensor:
        return scale * F.normalize(f, dim=-1) @ means.T

    return logits


def find_linears(model: nn.Module, modules: list[str], option: str = "--data") -> dict[str, nn.Linear]:
    """The model's linear layer for each adapter module name, allowing for a wrapper prefix either side.
    `option` is the one whose computation needs the layers (the encoder is loaded without its pooler)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    where = f"{option}: an adapted layer the encoder (loaded without its pooler) must hold"
    return {name: linears[match_module(name, linears, where)] for name in modules}
