"""LoRA adapters through PEFT, and weights as W_0 + D: inject a fresh adapter per task, read its task vector.

pmserve keeps the backbone as plain `W_0 + D` weights (D = the merged deltas); each task wraps the backbone with
a new PEFT LoRA (B = 0 at start), trains it, saves it where `peft.PeftModel.from_pretrained` can load it
(formats.peft.save_adapter), and unloads it again. The task vector of an adapted matrix is the product
scaling * B @ A (lora_delta). Every place that writes a merged weight, in memory or into a file, goes through
apply_delta, so a bf16 base gets the same bits from training, `pmserve merge` and export.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PMError

ADAPTER = "default"
Tensors = dict[str, torch.Tensor]


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The task vector of one adapted matrix: the low-rank product scaling * B @ A, in fp32 (scaled in place: a
    second weight-sized tensor would cost its page faults as well as its pass)."""
    return (lora_B.float() @ lora_A.float()).mul_(scaling)


def apply_delta(w0: torch.Tensor, delta: torch.Tensor, check: str | None = None) -> torch.Tensor:
    """W_0 + D in the weight's dtype: the sum in fp32, rounded once (the one arithmetic for every writer).

    With `check` (what to call the weight in the message), a sum that is NaN or beyond the dtype's range is a
    PMError; the test runs on the fp32 sum, where it is several times cheaper than on a bf16 result."""
    total = delta.float() + w0  # w0 is promoted exactly; one fp32 temporary, not two
    if check is not None:
        top, (lo, hi) = torch.finfo(w0.dtype).max, torch.aminmax(total)  # no |total| temporary
        if not -top <= float(lo) <= float(hi) <= top:  # False for NaN too
            raise PMError(f"{check} overflows {w0.dtype} (NaN or Inf)")
    return total.to(w0.dtype)


def match_module(name: str, candidates, where: str) -> str:
    """The one of `candidates` that is `name`, allowing for a wrapper prefix on either side (an adapter trained
    on BertForSequenceClassification names `bert.encoder...`, a BertModel `encoder...`); else a PMError."""
    candidates = list(candidates)
    if name in candidates:
        return name
    hits = [c for c in candidates if c.endswith("." + name) or name.endswith("." + c)]
    if len(hits) != 1:
        what = "no" if not hits else f"{len(hits)} candidate"
        raise PMError(f"{where}: {name} has {what} match in the base model")
    return hits[0]


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
    from transformers.pytorch_utils import Conv1D

    targets = list(spec.target_modules)
    # GPT-2's Conv1D layers store their weight as in x out: PEFT's fan_in_fan_out (it would set it, warning)
    transposed = any(
        isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
        for n, m in model.named_modules()
    )
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=transposed,
    )
    try:
        with (
            warnings.catch_warnings()
        ):  # peft asks transformers a deprecated question; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:
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
    """Delta_t for every adapted matrix in its weight's layout: scaling * B @ A, transposed where PEFT says
    fan_in_fan_out (GPT-2's Conv1D stores its weight as in x out), as PEFT's own merge does."""
    out = {}
    for name, m in lora_layers(peft_model).items():
        d = lora_delta(
            m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach(), m.scaling[ADAPTER]
        )
        out[name] = d.T.contiguous() if getattr(m, "fan_in_fan_out", False) else d
    return out


def adapted_weights(model: nn.Module, names) -> dict[str, nn.Parameter]:
    """The `.weight` parameters of the named linear (or Conv1D) modules of a plain (unwrapped) backbone."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight for n in names}


@torch.no_grad()
def set_merged(model: nn.Module, base: Tensors, merged: Tensors) -> None:
    """Write W_0 + D into the backbone's adapted matrices (from W_0 each time, so a resumed run is bitwise equal)."""
    for name, w in adapted_weights(model, merged).items():
        w.copy_(apply_delta(base[name], merged[name]))
