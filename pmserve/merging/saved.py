"""PEFT's modules_to_save in a merge: whole tensors trained beside the LoRA (a SEQ_CLS adapter's classifier head).

Most adapters people bring were trained with PEFT on a *ForSequenceClassification model with task_type SEQ_CLS,
so PEFT also trained and saved the classifier whole (modules_to_save). Those tensors are not task vectors
B A; dropping them deploys the base's head, which scores at random. This module checks them (every adapter must
save the same tensors with the same shapes, and the base model must have a place of that shape for each), plans
their merge, and holds the one rule that combines them (combine_saved).

The rule, and why. Let S_t be adapter t's saved tensor and W_0 the base checkpoint's:
- avg, linear, task-arithmetic, pm (the methods that are sum_t c_t Delta_t): the same coefficients on the saved
  tensors' task vectors, theta = W_0 + sum_t c_t (S_t - W_0), when the base checkpoint holds W_0. Every adapter
  then started from that W_0 (PEFT copies the base's module before training it), so S_t - W_0 is a task vector
  like any other, and the head moves exactly as the backbone does. For avg, linear and pm on independent adapters
  the coefficients sum to 1, and this is the plain weighted average sum_t c_t S_t whatever W_0 is; only
  task-arithmetic with weights that do not sum to 1 differs, and then the user asked for task vectors scaled.
- A base checkpoint without the tensor (the usual bert-base-* with config.json set to *ForSequenceClassification:
  transformers draws a new random head every time the model loads, so each adapter started from a different W_0,
  and W_0 = 0 would shrink or inflate the head): the weighted average sum_t c_t S_t / sum_t c_t. That is what
  averaging heads means to PEFT's and mergekit's users, and it equals the rule above whenever sum_t c_t = 1.
- ties, dare-linear, dare-ties: the weighted average sum_t w_t S_t / sum_t w_t. Pruning and sign election are
  made for the many small entries of a big matrix's update; a head is small, dense and trained whole, and a pruned,
  rescaled head (DARE divides by the density) scores worse than an average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapters import match_module
from ..errors import PMError
from ..formats import read_json
from ..formats.peft import AdapterInput, saved_module_of
from .base import BaseModel

if TYPE_CHECKING:
    from .methods import MergeMethod

SAVED_POLICIES = ("average", "drop")  # --saved-modules
DROP_HINT = "--saved-modules drop merges without them, keeping the base's"


@dataclass
class SavedTensor:
    """One modules_to_save parameter every adapter saves, and where it lands in the base model."""

    name: str  # the parameter's name in the adapters' model (classifier.weight)
    module: str  # the modules_to_save module it belongs to (classifier)
    shape: tuple[int, ...]
    model_key: str  # the base model's parameter name (what a full folder writes)
    base_key: str | None  # the base checkpoint's tensor holding W_0; None when the checkpoint lacks it
    dtype: torch.dtype  # what a full folder writes: the base checkpoint's dtype, else the adapters'


@dataclass
class SavedMerge:
    """The plan for one saved tensor: theta = W_0 + sum_t c_t (S_t - W_0) ("task-vector"), or the weighted
    average sum_t c_t S_t with the c_t normalised to sum 1 ("average")."""

    tensor: SavedTensor
    rule: str  # "task-vector" | "average"
    coefficients: list[float]


def model_shapes(folder: Path) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """The architecture config.json names and its parameters' shapes, built on the meta device (no weights):
    where a parameter the checkpoint lacks would go, and the shape config.json (num_labels) gives it."""
    import warnings

    import transformers

    cfg = read_json(folder / "config.json")
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None) if arch else None
    if cls is None:
        return arch, {}
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls(transformers.AutoConfig.from_pretrained(str(folder)))
    except Exception:  # noqa: BLE001 -- an architecture we cannot build offers no place; the caller says so
        return arch, {}
    return arch, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _labels_hint(folder: Path) -> str:
    cfg = read_json(folder / "config.json")
    labels = list((cfg.get("id2label") or {}).values())
    return f"id2label has {len(labels)} labels" if labels else f"num_labels is {cfg.get('num_labels', 2)}"


def _disagreement(adapters: list[AdapterInput]) -> str | None:
    """Why the adapters' saved tensors cannot be merged together (None: the same names and shapes in all)."""
    ref = next(a for a in adapters if a.saved)
    for a in adapters:
        if not a.saved:
            name = next(iter(ref.saved))
            return (
                f"{a.tensors.path}: saves no PEFT modules_to_save, but {ref.tensors.path} saves "
                f"{saved_module_of(name, ref.saved_modules)} ({name})"
            )
        for x, y, has in ((a, ref, ref.saved), (ref, a, a.saved)):
            extra = [n for n in x.saved if n not in has]
            if extra:
                return (
                    f"{x.tensors.path}: saves {saved_module_of(extra[0], x.saved_modules)} ({extra[0]}), "
                    f"which {y.tensors.path} does not"
                )
        # a weight before its bias: the message names the matrix
        for n in sorted(a.saved, key=lambda n: -len(a.tensors.shapes[a.saved[n]])):
            got, want = a.tensors.shapes[a.saved[n]], ref.tensors.shapes[ref.saved[n]]
            if tuple(got) != tuple(want):
                return f"{a.tensors.path}: its saved {n} is {list(got)}, {ref.tensors.path}'s is {list(want)}"
    return None


def _place(a: AdapterInput, name: str, base: BaseModel, shapes: dict, arch: str | None) -> SavedTensor | str:
    """Where saved tensor `name` goes in the base model, or why it has no place there."""
    shape = tuple(a.tensors.shapes[a.saved[name]])
    module = saved_module_of(name, a.saved_modules)
    keys = base.weights.keys()
    try:
        base_key = match_module(name, keys, "")
    except PMError:
        base_key = None
    if base_key is not None:
        model_key, want = base_key, tuple(base.weights.shape(base_key))
    else:
        try:
            model_key = match_module(name, shapes, "")
        except PMError:
            return (
                f"{a.tensors.path}: saves {module} ({name}, PEFT modules_to_save), which the base {base.folder} "
                f"({arch or 'no architecture'}) has no place for; give a --base *ForSequenceClassification "
                f"folder whose config.json has the adapters' labels in id2label"
            )
        want = shapes[model_key]
    if want != shape:
        return (
            f"{base.folder / 'config.json'}: the base's {model_key} is {list(want)} ({_labels_hint(base.folder)}), "
            f"but {a.tensors.path} saves {name} as {list(shape)}; give a --base whose config.json has the "
            "adapters' labels in id2label"
        )
    dtype = base.weights.dtype(base_key) if base_key else a.tensors.dtypes[a.saved[name]]
    return SavedTensor(name, module, shape, model_key, base_key, dtype)


def check_saved(
    adapters: list[AdapterInput], base: BaseModel, policy: str
) -> tuple[list[SavedTensor], list[str]]:
    """The saved tensors a merge carries, and notes; a PMError naming the adapter and module when they cannot
    be merged (adapters that disagree, no place of that shape in the base) unless `policy` is drop."""
    if policy not in SAVED_POLICIES:
        raise PMError(f"--saved-modules: must be one of {', '.join(SAVED_POLICIES)}, got {policy!r}")
    holders = [a for a in adapters if a.saved]
    if not holders:
        return [], []
    first = holders[0]
    names = sorted(first.saved, key=lambda n: -len(first.tensors.shapes[first.saved[n]]))  # weights first
    why = _disagreement(adapters)
    placed: list[SavedTensor] = []
    if why is None:
        arch, shapes = model_shapes(base.folder)
        for n in names:
            p = _place(first, n, base, shapes, arch)
            if isinstance(p, str):
                why = p
                break
            placed.append(p)
    if policy == "drop":
        what = why or f"{len(holders)} adapters save {', '.join(names)}"
        return [], [
            f"PEFT modules_to_save dropped (--saved-modules drop): {what}; the merged model keeps the base's"
        ]
    if why:
        raise PMError(f"{why} ({DROP_HINT})")
    chained = [a for a in adapters if a.kind == "chained"]
    if chained:
        raise PMError(f"{chained[0].path}: a chained task adapter with PEFT modules_to_save is not supported")
    for a in adapters:
        for n in names:
            if not torch.isfinite(a.saved_tensor(n)).all():
                raise PMError(f"{a.tensors.path}: {a.saved[n]} holds NaN or Inf")
    return placed, []


def plan_saved(
    tensors: list[SavedTensor],
    method: MergeMethod,
    coefficients: list[float] | None,
    weights: list[float] | None,
) -> list[SavedMerge]:
    """Each saved tensor's rule and coefficients (the module docstring says why): the task vectors'
    coefficients on S_t - W_0 where the base holds W_0 and the method is linear or sequential; else a weighted
    average, the coefficients (or ties/dare's weights) normalised to sum 1."""
    if not tensors:
        return []
    linear = method.linear or method.sequential
    c = [float(x) for x in (coefficients if linear else weights)]
    out = []
    for t in tensors:
        if linear and t.base_key is not None:
            out.append(SavedMerge(t, "task-vector", c))
            continue
        if sum(c) == 0:
            raise PMError(
                f"--weights: they sum to 0, so the saved {t.name} (PEFT modules_to_save) has no weighted average "
                f"({DROP_HINT})"
            )
        out.append(SavedMerge(t, "average", [x / sum(c) for x in c]))
    return out


def combine_saved(
    saved: list[torch.Tensor], coefficients: list[float], w0: torch.Tensor | None
) -> torch.Tensor:
    """theta = W_0 + sum_t c_t (S_t - W_0), computed as sum_t c_t S_t + (1 - sum_t c_t) W_0 in fp32; without W_0
    the sum alone (the weighted average, for coefficients that sum to 1)."""
    out = torch.zeros(saved[0].shape, dtype=torch.float32)
    for c, s in zip(coefficients, saved):
        out += c * s.float()
    if w0 is not None:
        out += (1.0 - sum(coefficients)) * w0.float()
    return out


def saved_record(merges: list[SavedMerge], policy: str, base_folder: Path) -> dict | None:
    """merge_report.json's "saved_modules": what was merged, by which rule, and the labels the head scores."""
    if not merges:
        return {"policy": policy, "tensors": []} if policy == "drop" else None
    cfg = read_json(base_folder / "config.json")
    id2label = cfg.get("id2label") or {}
    return {
        "policy": policy,
        "modules": sorted({m.tensor.module for m in merges}),
        "labels": [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None,
        "tensors": [
            {
                "name": m.tensor.name,
                "shape": list(m.tensor.shape),
                "rule": m.rule,
                "coefficients": m.coefficients,
                "base_holds_it": m.tensor.base_key is not None,
            }
            for m in merges
        ],
    }


def saved_note(merges: list[SavedMerge]) -> str | None:
    """One line for the notes and the model card."""
    if not merges:
        return None
    names = ", ".join(m.tensor.name for m in merges)
    rules = {m.rule for m in merges}
    if rules == {"task-vector"}:
        how = "W_0 + sum_t c_t (S_t - W_0), the task vectors' coefficients"
        if abs(sum(merges[0].coefficients) - 1) < 1e-9:
            how += " (they sum to 1: the weighted average of the adapters' tensors)"
    elif rules == {"average"}:
        how = "the weighted average sum_t c_t S_t (coefficients normalised to 1)"
        if all(m.tensor.base_key is None for m in merges):
            how += "; the base checkpoint holds none of them, so there is no shared W_0"
    else:
        how = "W_0 + sum_t c_t (S_t - W_0) where the base holds W_0, else the weighted average"
    return f"PEFT modules_to_save merged ({names}): {how}"
