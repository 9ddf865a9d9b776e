"""The deployable bundle's files: what they are, the manifest that lists them with sha256 hashes, and its check.

A BUNDLE folder holds model.onnx (merged weights, pooling and classifier in one graph), the tokenizer or image
processor files, labels.json (a list: class index -> label) and manifest.json. The manifest records where the
model came from, the graph's inputs and outputs, and the size and sha256 of every other file, so a file that is
missing, truncated or altered after export is found before a single input is scored.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PMError
from . import LABELS, read_json, read_labels, sha256_file, write_json

MANIFEST = "manifest.json"
MODEL = "model.onnx"
FORMAT = "pmserve-bundle"
VERSION = 1


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file under `folder` except the manifest itself."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Add the file table and format tag to `manifest` and write it as folder/manifest.json."""
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "files": file_table(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


def write_labels(folder: Path, labels: list[str]) -> None:
    (folder / LABELS).write_text(json.dumps(list(labels), indent=2))


def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise PMError(f"{folder}: does not exist or is not a folder")
    if not path.is_file():
        raise PMError(f"{folder}: not a bundle (no {MANIFEST}; `pmserve export` writes one)")
    m = read_json(path)
    if m.get("format") != FORMAT:
        raise PMError(f"{path}: not a pmserve bundle manifest (format is not {FORMAT!r})")
    if m.get("version", 0) > VERSION:
        raise PMError(f"{path}: bundle version {m['version']} is newer than this pmserve reads ({VERSION})")
    for key in ("files", "inputs", "outputs", "input_kind"):
        if key not in m:
            raise PMError(f"{path}: no {key!r} entry")
    return m


def verify_bundle(folder: Path | str, hashes: bool = True) -> dict:
    """The bundle's manifest, after checking every listed file exists with its recorded size and sha256."""
    folder = Path(folder)
    m = read_manifest(folder)
    files = m["files"]
    for required in (MODEL, LABELS):
        if required not in files:
            raise PMError(f"{folder / MANIFEST}: does not list {required}")
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            raise PMError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != info.get("bytes"):
            raise PMError(f"{p}: altered ({p.stat().st_size} bytes, {MANIFEST} says {info.get('bytes')})")
        if hashes and sha256_file(p) != info.get("sha256"):
            raise PMError(f"{p}: altered (sha256 differs from {MANIFEST})")
    labels = read_labels(folder / LABELS)
    if m["outputs"] and m["outputs"][0]["shape"][-1] != len(labels):
        raise PMError(
            f"{folder / LABELS}: {len(labels)} labels, but the model scores {m['outputs'][0]['shape'][-1]}"
        )
    m["labels"] = labels
    return m
