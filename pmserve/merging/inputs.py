"""The inputs of a merge, read and checked before anything is computed: adapters (or RUNs) and the base model.

Everything that can be wrong with them (base identity, target modules, shapes, NaN/Inf, negative Fishers, PEFT
modules_to_save that disagree or do not fit the base) is one PMError naming the file, raised before OUT exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..defaults import UNKNOWN_MAX_LENGTH
from ..errors import PMError
from ..formats import peft as peft_files
from ..formats import run as run_files
from ..formats.peft import AdapterInput
from .base import BaseModel
from .saved import SavedTensor, check_saved


def expand_inputs(paths: list[Path | str]) -> list[Path]:
    """Adapter folders in task order: each path is an adapter folder or a RUN (its finished task adapters)."""
    if not paths:
        raise PMError("ADAPTER_DIR: give at least one adapter folder or RUN")
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise PMError(f"{p}: does not exist or is not a folder")
        if (p / peft_files.CONFIG).is_file():
            out.append(p)
        elif run_files.is_run(p):
            found = [d for d in run_files.finished_tasks(p) if (d / peft_files.CONFIG).is_file()]
            if not found:
                raise PMError(
                    f"{p}: a pmserve RUN without task adapters (a --method frozen run, or no finished task)"
                )
            out += found
        else:
            raise PMError(
                f"{p}: neither a PEFT adapter folder (adapter_config.json) nor a pmserve RUN (tasks/)"
            )
    return out


@dataclass
class Inputs:
    """Adapters checked against each other and against the base; `keys` maps each module to its base tensor."""

    adapters: list[AdapterInput]
    base: BaseModel
    modules: list[str]  # natural order: layer 2 before layer 10
    keys: dict[str, str]
    warnings: list[str]
    saved: list[SavedTensor] = field(default_factory=list)  # PEFT modules_to_save every adapter holds

    @property
    def max_length(self) -> int:
        """The tokenizer length the adapters were trained with (their RUN's config), else UNKNOWN_MAX_LENGTH."""
        rcs = [a.run_config for a in self.adapters if "max_length" in (a.run_config or {})]
        return int(rcs[0]["max_length"]) if rcs else UNKNOWN_MAX_LENGTH


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_inputs(adapters: list[AdapterInput], base: BaseModel, saved_policy: str = "average") -> Inputs:
    """Everything that can be wrong with the inputs, found before anything is written: one PMError naming the file.
    `saved_policy` (--saved-modules): average merges the adapters' PEFT modules_to_save, drop leaves them out."""
    notes: list[str] = []
    first = adapters[0]
    for a in adapters:
        fp = a.meta.get("base_fingerprint")
        if fp and fp != base.fingerprint:
            raise PMError(
                f"{a.path / 'pmserve_adapter.json'}: made for another base model "
                f"(fingerprint {fp}; {base.spec} has {base.fingerprint})"
            )
        if set(a.modules) != set(first.modules):
            diff = sorted(set(a.modules) ^ set(first.modules), key=natural_key)
            raise PMError(
                f"{a.tensors.path}: inconsistent target modules: {diff[0]} is adapted in only one of "
                f"{first.path} and {a.path}"
            )
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise PMError(f"{a.path / 'adapter_config.json'}: fan_in_fan_out differs from {first.path}'s")
        if a.ignored:
            notes.append(
                f"{a.path}: ignored {len(a.ignored)} tensors that are not LoRA factors (e.g. {a.ignored[0]})"
            )
    modules = sorted(first.modules, key=natural_key)
    keys = {m: base.key_for(m, first.tensors.path) for m in modules}
    for a in adapters:
        for m in modules:
            shape = tuple(base.weights.shape(keys[m]))
            mod = a.modules[m]
            (_, i), (o, _) = a.tensors.shapes[mod.a_key], a.tensors.shapes[mod.b_key]
            dshape = (i, o) if a.fan_in_fan_out else (o, i)
            if dshape != shape:
                raise PMError(
                    f"{a.tensors.path}: {m} makes a {list(dshape)} update, but the base's {keys[m]} is {list(shape)}"
                )
            for k in (mod.a_key, mod.b_key):
                if not torch.isfinite(a.tensors.get(k)).all():
                    raise PMError(f"{a.tensors.path}: {k} holds NaN or Inf")
            if a.fisher is not None:
                if tuple(a.fisher.shapes[m]) != shape:
                    raise PMError(
                        f"{a.fisher.path}: {m} is {list(a.fisher.shapes[m])}, the base's weight {list(shape)}"
                    )
                f = a.fisher.get(m)
                if not torch.isfinite(f).all():
                    raise PMError(f"{a.fisher.path}: {m} holds NaN or Inf")
                if (f < 0).any():
                    raise PMError(f"{a.fisher.path}: {m} has negative entries (a diagonal Fisher cannot)")
                del f
    chained = [a for a in adapters if a.kind == "chained"]
    if chained:
        runs = {a.path.parent for a in chained}
        order = [a.meta.get("task") for a in adapters]
        if len(chained) != len(adapters) or len(runs) != 1 or order != list(range(len(adapters))):
            notes.append(
                "chained adapters that are not one RUN's tasks 0..T-1 in order: each was trained on its own run's "
                "merged model, which this merge does not rebuild"
            )
    saved, saved_notes = check_saved(adapters, base, saved_policy)
    return Inputs(adapters, base, modules, keys, notes + saved_notes, saved)
