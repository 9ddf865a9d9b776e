"""Every file pmserve writes or reads, owned here: one submodule per on-disk format.

- `run`: a RUN folder (config.json marked as a RUN, plan.json, the state after its last task stored once,
  tasks/NN-name/ with what is each task's own, metrics.json);
- `peft`: PEFT LoRA adapter folders (adapter_config.json, adapter_model.safetensors, pmserve_adapter.json);
- `merged`: what `pmserve merge` writes and what export reads as a merged model (a RUN or a full folder);
- `bundle`: the deployable ONNX bundle, its manifest and its parity probe;
- `pooling`: a sentence encoder's pooling and normalisation, as sentence-transformers' modules.json declares them;
- `repository`: bundles as numbered versions of named models (REPO/NAME/1, /2, ...), as Triton and KServe keep them.

This module holds what they share: reading a JSON object with a one-line error and writing one atomically and
durably; writing a folder so that it appears only when complete, and hashing a file, are pmserve.files'. Train, merge, export and serve go through these, so a
file name or an atomic write exists once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PMError
from ..files import atomic_dir, fsync_dir, sha256_file  # noqa: F401 -- shared by every format

MODEL_CARD = "README.md"  # the model card in every task folder and merged model
LABELS = "labels.json"  # class index -> label, beside a merged model or a bundle


def read_json(path: Path) -> dict:
    """A JSON object from `path`; unreadable, malformed or not an object is a PMError naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise PMError(f"{path}: unreadable ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PMError(f"{path}: bad JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PMError(f"{path}: expected a JSON object")
    return obj


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON at `path`, replaced atomically (a reader never sees half a file) and durably (the
    file's bytes reach the disk before the rename, and the rename before this returns)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_labels(path: Path) -> list[str]:
    """labels.json: a list (index -> label) or an object {"0": label, ...}."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PMError(f"{path}: unreadable ({e})") from None
    if isinstance(obj, dict):
        try:
            obj = [obj[str(i)] for i in range(len(obj))]
        except KeyError:
            raise PMError(f"{path}: keys must be the class indices 0..{len(obj) - 1}") from None
    if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
        raise PMError(f"{path}: expected a list of label strings")
    return obj


def check_new_out(out: Path) -> None:
    """An output folder must be new or empty: finished work is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PMError(f"{out}: already exists; choose a new --out")
