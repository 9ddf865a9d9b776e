"""The adaptation gate: keep a task's update only as far as it pays on that task's own held-out data.

With few examples per class the frozen encoder and the ridge head are hard to beat (issue 36: pm 0.4 to 0.8
points below frozen on two real-text benchmarks), so with `--gate` a task's LoRA trains on its training data
less a held-out share (GATE_HOLDOUT, drawn by seed), and after the merge the update is scaled by each of
GATE_SCALES (1: as merged, 0: skipped, the backbone before the task). For each scale the inference classifier
(ridge or prototypes, as the run's --head) is the one before the task plus the task's training rows under that
backbone, and it scores the held-out rows over every class seen; the scale with the best held-out accuracy is
kept, ties to the larger update (skipping must show a gain). Only the current task's data is used, never old
data, and the old statistics are not carried for the comparison (the same for every scale). The decision
goes into the task's record (task.json "gate").
"""

from __future__ import annotations

import copy

import torch

from .adapters import set_merged
from .heads import Ridge
from .seeds import GATE, ridge_seed, stream_generator
from .tasks import Split, Task

GATE_HOLDOUT = 0.2  # share of a task's training rows held out to judge its update
GATE_SCALES = (1.0, 0.5, 0.0)  # of the merged update, larger first (ties keep the larger)


def split_task(task: Task, seed: int, index: int) -> tuple[Task, Split]:
    """The task with a held-out share of its training rows removed (what its LoRA trains on), and that share;
    at least one training row of every class stays in the fit."""
    g = stream_generator(seed, index, GATE)
    n = len(task.train.labels)
    order = torch.randperm(n, generator=g).tolist()
    held, kept_class = [], set()
    want = int(n * GATE_HOLDOUT)
    for j in reversed(order):  # hold out from the end of the permutation, keeping each class's first row
        y = task.train.labels[j]
        if len(held) < want and y in kept_class:
            held.append(j)
        kept_class.add(y)
    held_set = set(held)
    fit = [j for j in range(n) if j not in held_set]
    pick = lambda idx: Split([task.train.inputs[j] for j in idx], [task.train.labels[j] for j in idx])  # noqa: E731
    return Task(task.name, task.kind, pick(fit), task.test, task.classes), pick(sorted(held))


def choose_scale(learner, index: int, previous: dict, fit: Split, held: Split) -> dict:
    """Scale the learner's merged update of this task (merged - previous) by the GATE_SCALES entry with the
    best held-out accuracy, leave the backbone there, and return the record: accuracy per scale and the scale."""
    if not held.labels:  # too few rows to hold any out: nothing to judge by, so the update stays
        return {"held_out": 0, "acc": {}, "scale": 1.0}
    merged = learner.merged
    base = next(iter(learner.classifiers.values()))

    def scaled(c: float) -> dict:  # 1 and 0 exactly as merged and as before, bit for bit
        return (
            merged
            if c == 1
            else previous
            if c == 0
            else {k: previous[k] + c * (merged[k] - previous[k]) for k in merged}
        )

    accs = {}
    for c in GATE_SCALES:
        set_merged(learner.encoder.model, learner.base, scaled(c))
        clf = copy.deepcopy(base)
        if isinstance(clf, Ridge):
            clf.reject = 0.0  # the threshold is the real classifier's business, not this comparison's
            clf.fit(learner.features(fit), fit.labels, seed=ridge_seed(learner.cfg.seed, index))
        else:
            clf.update(learner.features(fit), fit.labels)
        pred = clf.scores(learner.features(held)).argmax(1).tolist()
        accs[c] = sum(clf.labels[k] == y for k, y in zip(pred, held.labels)) / len(pred)
    best = max(GATE_SCALES, key=lambda c: (accs[c], c))
    learner.merged = scaled(best)
    set_merged(learner.encoder.model, learner.base, learner.merged)
    return {"held_out": len(held.labels), "acc": {str(c): a for c, a in accs.items()}, "scale": best}
