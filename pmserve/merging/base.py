"""The base model of a merge: the local folder its adapters adapt, its identity, and its weights, read lazily.

Its own module because every step of a merge holds it (the inputs' checks, the saved modules' placement, the
executor) while none of them owns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..adapters import base_fingerprint, match_module
from ..backbone import resolve_model
from ..errors import PMError
from ..formats.peft import AdapterInput
from ..tensor_io import ModelWeights


@dataclass
class BaseModel:
    spec: str
    folder: Path
    fingerprint: str
    weights: ModelWeights

    def key_for(self, module: str, where: Path) -> str:
        """The base tensor that `module`'s LoRA adapts: `module.weight`, a wrapper prefix allowed either side."""
        return match_module(f"{module}.weight", self.weights.keys(), f"{where} (base {self.folder})")


def resolve_base(spec: str | None, adapters: list[AdapterInput]) -> BaseModel:
    """--base, or the local base model the adapters name (pmserve metadata, the RUN's config, PEFT's config)."""
    if not spec:
        for a in adapters:
            for cand in (
                a.meta.get("base_model"),
                (a.run_config or {}).get("model"),
                a.config.get("base_model_name_or_path"),
            ):
                if cand and (str(cand).startswith("builtin:") or Path(cand).is_dir()):
                    spec = str(cand)
                    break
            if spec:
                break
        if not spec:
            raise PMError("--base: not given, and the adapters name no base model folder on this machine")
    folder = resolve_model(spec)
    return BaseModel(spec, folder, base_fingerprint(folder), ModelWeights(folder))
