"""PEFT LoRA adapter folders: the files, their keys and scaling, read lazily and checked.

    adapter_config.json         PEFT's LoraConfig (r, lora_alpha, rank/alpha patterns, use_rslora, fan_in_fan_out)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r];
                                with PEFT's modules_to_save (a SEQ_CLS adapter's classifier) also the whole
                                modules' tensors: base_model.model.classifier.weight (PEFT >= 0.15), or
                                base_model.model.classifier.modules_to_save.weight (older PEFT)
    pmserve_adapter.json        pmserve's metadata: kind (chained | independent), task, labels, base fingerprint
    fisher.safetensors          optional: the diagonal Fisher of every adapted weight, for `pmserve merge`
    README.md                   the model card

The key patterns and PEFT's scaling rule (lora_alpha / r, or / sqrt(r) with rslora) live here and nowhere else,
and so do the modules_to_save keys: `saved_key` reads them, `saved_file_key` writes them as PEFT loads them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import lora_delta
from ..errors import PMError
from ..tensor_io import FLOATS, LazyTensors
from . import MODEL_CARD, read_json
from .run import FISHER, read_config, run_of_task

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
META = "pmserve_adapter.json"
FILES = (CONFIG, WEIGHTS, META, FISHER)  # what a merge report hashes
KINDS = ("chained", "independent")
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
SAVED_SEGMENT = ".modules_to_save"  # older PEFT kept it in the saved key (PEFT's adapter name removed)


@dataclass
class LoraModule:
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass
class AdapterInput:
    """One PEFT LoRA adapter folder, its header read and checked; tensors are read only when asked for."""

    path: Path
    name: str
    kind: str
    config: dict
    meta: dict
    tensors: LazyTensors
    modules: dict[str, LoraModule]
    fan_in_fan_out: bool
    fisher: LazyTensors | None
    run_config: dict | None
    ignored: list[str] = field(default_factory=list)
    # PEFT's modules_to_save: the model's parameter name (classifier.weight, as in the base's state dict) -> the
    # key in adapter_model.safetensors. Whole tensors trained with the adapter, not task vectors.
    saved: dict[str, str] = field(default_factory=dict)
    fisher_source: str | None = (
        None  # "files", "data" (from --data), "identity" or "run" (its recorded alpha)
    )

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modules[module]
        return self.tensors.get(m.a_key), self.tensors.get(m.b_key)

    def delta(self, module: str) -> torch.Tensor:
        """Delta_t of one module in the base weight's layout, fp32 (adapters.lora_delta, as training computes it)."""
        return self.delta_rows(module, 0, None).contiguous()

    def delta_rows(self, module: str, start: int, stop: int, factors=None) -> torch.Tensor:
        """Rows start:stop of delta(module), computed from the factors' matching slice alone."""
        a, b = factors or self.factors(module)
        s = self.modules[module].scaling
        return (
            lora_delta(a[:, start:stop], b, s).T if self.fan_in_fan_out else lora_delta(a, b[start:stop], s)
        )

    def row_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R), fp32, with delta(module) = L @ R in the base weight's layout and the scaling folded into L: rows
        of the task vector are rows of L times R, whatever fan_in_fan_out says."""
        a, b = (f.float() for f in self.factors(module))
        s = self.modules[module].scaling
        return (a.T, s * b.T) if self.fan_in_fan_out else (s * b, a)

    def delta_shape(self, module: str) -> tuple[int, int]:
        """The shape of delta(module): the base weight's."""
        m = self.modules[module]
        (_, i), (o, _) = self.tensors.shapes[m.a_key], self.tensors.shapes[m.b_key]
        return (i, o) if self.fan_in_fan_out else (o, i)

    def fisher_of(self, module: str) -> torch.Tensor:
        return self.fisher.get(module).float()

    def saved_tensor(self, key: str) -> torch.Tensor:
        """A modules_to_save tensor by the model's parameter name (a key of `saved`), as stored."""
        return self.tensors.get(self.saved[key])

    @property
    def saved_modules(self) -> list[str]:
        """adapter_config.json's modules_to_save (what PEFT wraps and saves whole), [] when none."""
        return list(self.config.get("modules_to_save") or [])

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels") or [])


def _pattern_value(patterns: dict, module: str, default):
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key  # imports transformers: only when there are patterns

    return patterns.get(get_pattern_key(list(patterns), module), default)


def read_adapter(path: Path) -> AdapterInput:
    """Read and check one adapter folder's config, metadata and tensor headers (not the tensors themselves)."""
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PMError(f"{cfg_path}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise PMError(f"{cfg_path}: a DoRA adapter; its magnitude vector does not merge linearly")
    r, lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(lora_alpha, (int, float)):
        raise PMError(f"{cfg_path}: needs an integer r >= 1 and a number lora_alpha")
    file = path / WEIGHTS
    if not file.is_file() and (path / WEIGHTS_BIN).is_file():
        raise PMError(
            f"{path / WEIGHTS_BIN}: only safetensors adapters are read; re-save with safe_serialization=True"
        )
    tensors = LazyTensors(file)  # reopened per tensor: a mapping held open keeps what it touched resident
    meta_path = path / META
    meta = read_json(meta_path) if meta_path.exists() else {}
    kind = meta.get("kind", "independent")
    if kind not in KINDS:
        raise PMError(f"{meta_path}: kind must be chained or independent, got {kind!r}")

    found: dict[str, dict[str, str]] = {}
    ignored = []
    saved: dict[str, str] = {}
    entries = cfg.get("modules_to_save") or []
    for key in tensors.keys():
        m = LORA_KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise PMError(
                    f"{file}: {key} is not a linear LoRA factor (embedding LoRA and DoRA are not merged)"
                )
            name = saved_key(key, entries)
            if name is None:
                ignored.append(key)  # biases and the like: not part of any task vector
                continue
            if tensors.dtypes[key] not in FLOATS:
                raise PMError(f"{file}: {key} is {tensors.dtypes[key]}, not a floating-point tensor")
            if name in saved:
                raise PMError(f"{file}: {saved[name]} and {key} are both the saved {name}")
            saved[name] = key
            continue
        module = m.group("module")
        module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        if m.group("ab") in found.setdefault(module, {}):
            raise PMError(
                f"{file}: two lora_{m.group('ab')} tensors for {module} (several adapters in one file?)"
            )
        found[module][m.group("ab")] = key
    if not found:
        raise PMError(f"{file}: holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight)")

    modules = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise PMError(
                f"{file}: {module} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}"
            )
        sa, sb = tensors.shapes[ab["A"]], tensors.shapes[ab["B"]]
        if len(sa) != 2 or len(sb) != 2:
            raise PMError(f"{file}: {module} is not a linear LoRA (factor shapes {list(sa)}, {list(sb)})")
        if sa[0] != sb[1]:
            raise PMError(f"{file}: {module}'s lora_A {list(sa)} and lora_B {list(sb)} have different ranks")
        for k in ab.values():
            if tensors.dtypes[k] not in FLOATS:
                raise PMError(f"{file}: {k} is {tensors.dtypes[k]}, not a floating-point tensor")
        rank = _pattern_value(cfg.get("rank_pattern") or {}, module, r)
        if rank != sa[0]:
            raise PMError(f"{file}: {module} has rank {sa[0]}, but {cfg_path.name} says {rank}")
        modules[module] = LoraModule(ab["A"], ab["B"], rank, lora_scaling(cfg, module, rank))

    fisher = None
    if (path / FISHER).exists():
        fisher = LazyTensors(path / FISHER)
        if set(fisher.keys()) != set(modules):
            extra = sorted(set(fisher.keys()) ^ set(modules))
            raise PMError(f"{fisher.path}: its modules differ from the adapter's (e.g. {extra[0]})")
    run = run_of_task(path)
    run_config = read_config(run) if run is not None else None  # an unreadable one is an error, not None
    name = str(meta.get("name") or path.name)
    return AdapterInput(
        path,
        name,
        kind,
        cfg,
        meta,
        tensors,
        modules,
        bool(cfg.get("fan_in_fan_out")),
        fisher,
        run_config,
        ignored,
        saved,
        "files" if fisher is not None else None,
    )


def saved_key(key: str, entries: list[str]) -> str | None:
    """The model's parameter name of a modules_to_save tensor of adapter_model.safetensors (None: not one).

    PEFT wraps every module whose name is an entry of modules_to_save or ends with "." + an entry, and saves its
    parameters as base_model.model.<module>.<param> (older PEFT: <module>.modules_to_save.<param>)."""
    name = key.removeprefix(PEFT_PREFIX)
    if SAVED_SEGMENT + "." in name:
        name = name.replace(SAVED_SEGMENT + ".", ".", 1)
    parts = name.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module == e or module.endswith("." + e) for e in entries):
            return name
    return None


def saved_file_key(name: str) -> str:
    """The key PEFT (the installed version, >= 0.15) saves and loads a modules_to_save parameter under."""
    return PEFT_PREFIX + name


def saved_module_of(name: str, entries: list[str]) -> str:
    """The modules_to_save entry a saved parameter belongs to (for messages): `classifier` of classifier.weight."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        for e in entries:
            if module == e or module.endswith("." + e):
                return module
    return name.rsplit(".", 1)[0]


def lora_scaling(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module's branch, as peft's LoraLayer sets it: lora_alpha / r, or / sqrt(r) (rslora)."""
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha"))
    return alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank


def save_adapter(peft_model, out: Path, base_model: str, metadata: dict) -> None:
    """PEFT's adapter_model.safetensors + adapter_config.json and pmserve's metadata; PEFT's blank model card is
    dropped (the caller writes a real one, model_card.task_card, once the task's results are known)."""
    peft_model.save_pretrained(str(out))
    cfg_path = out / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / META).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    (out / MODEL_CARD).unlink(missing_ok=True)
