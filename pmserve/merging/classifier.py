"""The inference classifier of an offline merge: carried over from the adapters, or recalibrated on data.

Prototype and ridge classifiers are sums (per-class feature sums and counts; RanPAC's Gram matrix G and class
sums Q), so the classifiers of several adapters add exactly into the classifier of their pooled data. The
result is approximate all the same: each adapter's statistics were computed with its own backbone (a RUN's
with the run's merged model after each task), not with the merged model being written (BENCHMARKS.md measures
that drift). `--calibrate DATA` recomputes them with the merged model itself on DATA's training sets, task
by task in order, exactly as `pmserve train` builds them after each merge (ridge chooses lambda per task on a
held-out part of that task's training data).

A RUN's task adapters are chained and each task's classifier already holds every task before it, so a RUN
contributes its last task's classifier; every other adapter contributes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import PMError
from ..formats import LABELS, write_json
from ..formats import run as run_files
from ..formats.peft import AdapterInput
from ..formats.run import CLASSIFIER, HEAD
from ..heads import LabelHead, Prototypes, Ridge, Scorer, load_scorer, save_scorer, scorer_kind
from ..seeds import ridge_seed

if TYPE_CHECKING:
    from ..tasks import Task
    from .inputs import Inputs

DeltaOf = Callable[[int, str], torch.Tensor]  # (module index, module) -> W_hat - W_0 of the merged model

CALIBRATE_HEADS = ("prototype", "ridge")


def contributors(ads: list[AdapterInput]) -> list[AdapterInput]:
    """The adapters whose classifiers add up: the last task of each RUN, and every adapter not from a RUN."""
    last: dict[Path, AdapterInput] = {}
    for a in ads:
        last[a.path.parent.parent if a.run_config is not None else a.path] = a
    return list(last.values())


def classifier_home(a: AdapterInput) -> Path:
    """Where an adapter's classifier files are: its folder; for the last finished task of a RUN, the RUN's
    state (a format-2 RUN keeps its classifier once, not per task: an earlier task of it carries none)."""
    run = run_files.run_of_task(a.path)
    if run is None or run_files.format_version(run) < 2:
        return a.path
    snap = run_files.snapshot(run)
    return snap.state if a.path.resolve() == snap.finished[-1].resolve() else a.path


def combine(scorers: list[Scorer]) -> Scorer:
    """One classifier over every label of `scorers` (all of one kind and size): statistics add, rows stack.

    A label in several linear/cosine heads keeps its last row (rows of different backbones do not average).
    Ridge keeps the last classifier's lambda (choosing one needs data: --calibrate).
    """
    first, kind = scorers[0], scorer_kind(scorers[0])
    if len(scorers) == 1:
        return first
    if isinstance(first, LabelHead):
        out = LabelHead(first.dim, first.kind, first.scale)
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in scorers:
            rows.update({y: (s.weight.data[i], s.bias.data[i]) for i, y in enumerate(s.labels)})
        out.load(
            {
                "weight": torch.stack([w for w, _ in rows.values()]),
                "bias": torch.stack([b for _, b in rows.values()]),
            },
            list(rows),
        )
        return out
    labels = list(dict.fromkeys(y for s in scorers for y in s.labels))
    pos = {y: i for i, y in enumerate(labels)}
    if isinstance(first, Prototypes):
        out = Prototypes(first.dim)
        sums = torch.zeros(len(labels), first.dim, dtype=torch.float64)
        counts = torch.zeros(len(labels), dtype=torch.float64)
        for s in scorers:
            idx = torch.tensor([pos[y] for y in s.labels], dtype=torch.long)
            sums.index_add_(0, idx, s.sums)
            counts.index_add_(0, idx, s.counts)
        out.load({"sums": sums, "counts": counts}, labels)
        return out
    assert kind == "ridge"
    last = scorers[-1]
    out = Ridge(first.dim, first.size, first.seed, last.fixed_lam, last.select)
    G = sum(s.G for s in scorers)
    Q = torch.zeros(first.size, len(labels), dtype=torch.float64)
    for s in scorers:
        Q[:, [pos[y] for y in s.labels]] += s.Q
    n = torch.tensor([sum(s.n for s in scorers)], dtype=torch.float64)
    out.load({"G": G, "Q": Q, "n": n}, labels, last.lam)
    return out


def _mismatch(scorers: list[Scorer], where: list[Path]) -> str | None:
    """Why `scorers` cannot be combined (None: they can)."""
    ref = scorers[0]
    for s, p in zip(scorers[1:], where[1:]):
        if scorer_kind(s) != scorer_kind(ref):
            return f"{p} has a {scorer_kind(s)} classifier, {where[0]} a {scorer_kind(ref)} one"
        if s.dim != ref.dim:
            return f"{p}'s classifier reads {s.dim} features, {where[0]}'s {ref.dim}"
        if isinstance(s, Ridge) and (s.size, s.seed) != (ref.size, ref.seed):
            return (
                f"{p}'s ridge projection (size {s.size}, seed {s.seed}) differs from {where[0]}'s "
                f"(size {ref.size}, seed {ref.seed})"
            )
    return None


def carried(ads: list[AdapterInput]) -> tuple[Scorer | None, LabelHead | None, str]:
    """The inference classifier and training head the adapters carry, combined; and a note saying what it is."""
    parts = contributors(ads)
    homes = [classifier_home(a) for a in parts]
    missing = [h for h in homes if not (h / f"{CLASSIFIER}.json").is_file()]
    if missing:
        return (
            None,
            None,
            f"no classifier carried: {missing[0]} has none (give --calibrate DATA to build one)",
        )
    where = homes
    scorers = [load_scorer(p, CLASSIFIER) for p in where]
    why = _mismatch(scorers, where)
    if why:
        return None, None, f"no classifier carried: {why} (give --calibrate DATA to build one)"
    heads = [load_scorer(p, HEAD) for p in where if (p / f"{HEAD}.json").is_file()]
    head = combine(heads) if len(heads) == len(where) and not _mismatch(heads, where) else None
    source = "the RUN's last task" if len(parts) == 1 and parts[0].run_config is not None else "the adapters"
    note = (
        f"{scorer_kind(scorers[0])} classifier carried from {source} ({len(parts)} part(s) combined); approximate: "
        "its statistics were computed with the adapters' own backbones, not this merged model"
    )
    return combine(scorers), head, note


def calibration_tasks(data: str, seed: int, ads: list[AdapterInput]) -> list[Task]:
    """--calibrate's tasks, checked before anything is merged: they must cover every label the adapters know."""
    from ..tasks import load_tasks

    tasks = load_tasks(data, seed)
    labels = {y for a in ads for y in a.labels}
    missing = sorted(labels - {y for t in tasks for y in t.classes})
    if missing:
        raise PMError(
            f"--calibrate: {data} has no task with label {missing[0]!r}, which the adapters were trained on"
        )
    return tasks


def calibrate(
    inputs: Inputs,
    delta_of: DeltaOf,
    tasks: list[Task],
    seed: int,
    kind: str,
    like: Scorer | None,
    log: Callable[[str], None],
) -> Scorer:
    """A `kind` classifier built from the tasks' training features computed with the merged model."""
    from ..adapters import apply_delta
    from ..backbone import load_encoder, split_features
    from ..task_fisher import find_linears

    encoder, prep, _ = load_encoder(inputs.base.spec, tasks[0].kind, inputs.max_length)
    layers = find_linears(encoder.model, inputs.modules, "--calibrate")
    with torch.no_grad():
        for i, m in enumerate(inputs.modules):
            w = layers[m].weight
            w.copy_(apply_delta(w, delta_of(i, m)))
    dim = encoder.hidden_size
    if kind == "ridge":
        ridge = like if isinstance(like, Ridge) else None
        clf: Scorer = Ridge(dim, ridge.size, ridge.seed, ridge.fixed_lam) if ridge else Ridge(dim, seed=seed)
    else:
        clf = Prototypes(dim)
    for i, task in enumerate(tasks):
        feats = split_features(encoder, prep, task.train, torch.device("cpu"))
        if isinstance(clf, Ridge):
            lam = clf.fit(feats, task.train.labels, seed=ridge_seed(seed, i))  # as Learner.update_classifiers
            edge = " (at its grid's end)" if clf.on_edge else ""
            log(f"calibrate: task {task.name}, {len(feats)} examples, ridge lambda {lam:g}{edge}")
        else:
            clf.update(feats, task.train.labels)
            log(f"calibrate: task {task.name}, {len(feats)} examples")
    return clf


def write_classifier(
    tmp: Path,
    inputs: Inputs,
    delta_of: DeltaOf,
    calibrate_data: str | None,
    calibrate_tasks: list[Task] | None,
    calibrate_head: str | None,
    seed: int,
    labels: list[str],
    log: Callable[[str], None],
) -> dict:
    """classifier.* (the inference classifier), head.* (the training head) and labels.json (the classifier's
    labels, else `labels`) into `tmp`; returns merge_report.json's "classifier" record."""
    ads = inputs.adapters
    clf, head, note = carried(ads)
    record = {"source": "carried" if clf is not None else None, "approximate": clf is not None, "note": note}
    if calibrate_tasks is not None:
        carried_kind = scorer_kind(clf) if clf is not None else None
        kind = calibrate_head or (carried_kind if carried_kind in CALIBRATE_HEADS else "ridge")
        clf = calibrate(inputs, delta_of, calibrate_tasks, seed, kind, clf, log)
        record = {
            "source": "calibrated",
            "approximate": False,
            "data": calibrate_data,
            "note": f"{kind} classifier recomputed with the merged model on {calibrate_data}",
        }
    log(f"note: {record['note']}")
    labels = list(clf.labels) if clf is not None else labels
    if clf is not None:
        save_scorer(clf, tmp, CLASSIFIER)
        record["kind"] = scorer_kind(clf)
        if isinstance(clf, Ridge):
            record["lambda"], record["lambda_on_edge"] = clf.lam, clf.on_edge
    if head is not None:
        save_scorer(head, tmp, HEAD)
    if labels:
        write_json(tmp / LABELS, labels)
    return record
