"""LoRA adapters through PEFT: inject a fresh adapter per task, read its task vector, save it in PEFT's format.

pmserve keeps the backbone as plain `W_0 + D` weights (D = the merged deltas); each task wraps the backbone with
a new PEFT LoRA (B = 0 at start), trains it, saves it where `peft.PeftModel.from_pretrained` can load it, and
unloads it again. The task vector of an adapted matrix is the product scaling * B @ A (merge.lora_delta).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .merge import Tensors, lora_delta

ADAPTER = "default"


@dataclass
class LoraSpec:
    rank: int = 10
    alpha: float = 10.0
    target_modules: tuple[str, ...] = ("key", "value")


def base_fingerprint(model_dir: Path) -> str:
    """A short identity of a base model: the hash of its config and the sizes of its weight files."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap `model` (in place) with a fresh LoRA on the target modules; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0
    )
    try:
        with (
            warnings.catch_warnings()
        ):  # peft asks transformers a deprecated question; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:
        from .errors import PMError

        raise PMError(f"--target-modules: {str(e).splitlines()[0]}") from None


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped linear layers, keyed by their module path inside the base model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        n[len(prefix) :]: m
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and n.startswith(prefix)
    }


def task_vectors(peft_model: nn.Module) -> Tensors:
    """Delta_t for every adapted matrix: scaling * B @ A."""
    return {
        name: lora_delta(
            m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach(), m.scaling[ADAPTER]
        )
        for name, m in lora_layers(peft_model).items()
    }


def save_adapter(peft_model: nn.Module, out: Path, base_model: str, metadata: dict) -> None:
    """PEFT's adapter_model.safetensors + adapter_config.json, with pmserve's metadata in pmserve_adapter.json."""
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "pmserve_adapter.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))


def adapted_weights(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """The `.weight` parameters of the named linear modules of a plain (unwrapped) backbone."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight for n in names}


@torch.no_grad()
def set_merged(model: nn.Module, base: Tensors, merged: Tensors) -> None:
    """Write W_0 + D into the backbone's adapted matrices (from W_0 each time, so a resumed run is bitwise equal)."""
    for name, w in adapted_weights(model, merged).items():
        w.copy_((base[name].float() + merged[name].float()).to(w.dtype))
