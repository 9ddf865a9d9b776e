"""The pooling a sentence encoder's folder declares: sentence-transformers' modules.json and its module folders.

A sentence encoder's embedding is not the transformer's output but what its pipeline makes of it: a pooling over
the tokens (1_Pooling/config.json) and often an L2 normalisation (a Normalize module, which has no files of its
own). Export puts that pipeline into the graph, so it reads it from the files sentence-transformers reads.
Only what the graph can hold is accepted: Transformer, Pooling with one of mean / cls / max, Normalize; any
other module (Dense, LayerNorm, another pooling mode) is a PMError naming the file, never a silent difference.
Both Pooling config layouts are read: the old `pooling_mode_*_tokens` booleans and the newer `pooling_mode`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PMError
from . import read_json

MODULES = "modules.json"
SBERT_CONFIG = "sentence_bert_config.json"  # the Transformer module's max_seq_length
POOLINGS = ("mean", "cls", "max")  # what export's graph computes (backbone.Pooling)
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class DeclaredPooling:
    """What a sentence-transformers folder says its embedding is."""

    pooling: str  # mean | cls | max
    normalize: bool
    max_length: int | None  # sentence_bert_config.json's max_seq_length, when it has one
    file: Path  # the file the pooling was read from, for messages and the manifest


def _modules(folder: Path) -> list[dict]:
    path = folder / MODULES
    try:
        mods = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PMError(f"{path}: unreadable ({e})") from None
    if not isinstance(mods, list) or not all(isinstance(m, dict) and "type" in m for m in mods):
        raise PMError(f"{path}: expected a list of modules with a 'type' each")
    return sorted(mods, key=lambda m: m.get("idx", 0))


def module_folders(folder: Path) -> list[str]:
    """The sub-folders modules.json names (1_Pooling, 2_Normalize, ...): what must travel with the weights."""
    folder = Path(folder)
    if not (folder / MODULES).is_file():
        return []
    return [m["path"] for m in _modules(folder) if m.get("path") and (folder / m["path"]).is_dir()]


def read_pooling(folder: Path) -> DeclaredPooling | None:
    """The pooling and normalisation modules.json declares, or None when the folder has no modules.json."""
    folder = Path(folder)
    path = folder / MODULES
    if not path.is_file():
        return None
    mods = _modules(folder)
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in mods]
    other = [
        t
        for t, k in zip((m["type"] for m in mods), kinds)
        if k not in ("Transformer", "Pooling", "Normalize")
    ]
    if other:
        raise PMError(
            f"{path}: module {other[0]} is not one export can put in the graph "
            "(Transformer, Pooling and Normalize are)"
        )
    if kinds[:1] != ["Transformer"] or kinds.count("Pooling") != 1:
        raise PMError(f"{path}: expected a Transformer, then one Pooling (and optionally Normalize)")
    pool = mods[kinds.index("Pooling")]
    cfg_path = folder / str(pool.get("path", "")) / "config.json"
    if not cfg_path.is_file():
        raise PMError(f"{cfg_path}: missing (modules.json lists a Pooling module there); or give --pooling")
    mode = _pooling_mode(cfg_path, read_json(cfg_path))
    max_length = None
    if (folder / SBERT_CONFIG).is_file():
        max_length = read_json(folder / SBERT_CONFIG).get("max_seq_length")
    return DeclaredPooling(
        mode,
        "Normalize" in kinds[kinds.index("Pooling") :],
        int(max_length) if isinstance(max_length, int) and max_length > 1 else None,
        cfg_path,
    )


def _pooling_mode(path: Path, cfg: dict) -> str:
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else []
    else:
        modes = [m for key, m in _LEGACY_MODES.items() if cfg.get(key)]
    if cfg.get("include_prompt") is False:
        raise PMError(f"{path}: include_prompt false (pooling that skips a prompt) is not supported")
    if len(modes) != 1 or modes[0] not in POOLINGS:
        got = "+".join(map(str, modes)) or "none"
        raise PMError(
            f"{path}: pooling mode {got} is not supported (one of {', '.join(POOLINGS)}); or give --pooling"
        )
    return modes[0]
