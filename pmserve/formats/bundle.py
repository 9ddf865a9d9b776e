"""The deployable bundle's files: what they are, the manifest that lists them with sha256 hashes, and its check.

A BUNDLE folder holds model.onnx (merged weights, pooling and classifier in one graph), the tokenizer or image
processor files, labels.json (a list: class index -> label; a classifier's only), probe.json and manifest.json.
The manifest records its kind (classifier: output `scores` [batch, classes]; embedding: output `embedding`
[batch, dim]), where the model came from, the graph's inputs and outputs, and the size and sha256 of every other
file, so a file that is missing, truncated or altered after export is found before a single input is scored.
Bundles exported before kinds existed are classifiers.

probe.json holds a handful of raw inputs and the outputs the PyTorch model gave them at export, with the
tolerance export held ONNX Runtime to: a server runs the bundle on them before it serves it, so a bundle whose
files are intact but whose model is not the one exported (another model.onnx with a rewritten manifest, a
tokenizer that splits differently) is refused before a request sees it. Bundles exported before probes existed
have none; their manifest has no "probe" entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import PMError
from . import LABELS, read_json, read_labels, sha256_file, write_json

MANIFEST = "manifest.json"
MODEL = "model.onnx"
PROBE = "probe.json"
FORMAT = "pmserve-bundle"
VERSION = 1
KINDS = ("classifier", "embedding", "causal-lm")  # causal-lm: decoder_export's bundles


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


def bundle_kind(manifest: dict) -> str:
    """classifier or embedding (a bundle from before embeddings is a classifier)."""
    return manifest.get("kind", "classifier")


def require_encoder(folder: Path, manifest: dict) -> None:
    """A decoder bundle has no scores to predict or serve over the encoder protocol: say what reads it."""
    if bundle_kind(manifest) == "causal-lm":
        raise PMError(
            f"{folder}: a decoder (causal-lm) bundle; generate from it with `pmserve generate` or serve it "
            "with `pmserve serve` (predict and eval read classifier and embedding bundles)"
        )


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
    if bundle_kind(m) not in KINDS:
        raise PMError(f"{path}: kind {m['kind']!r} is not one this pmserve serves ({', '.join(KINDS)})")
    return m


def verify_bundle(folder: Path | str, hashes: bool = True) -> dict:
    """The bundle's manifest, after checking every listed file exists with its recorded size and sha256."""
    folder = Path(folder)
    m = read_manifest(folder)
    files = m["files"]
    classifier = bundle_kind(m) == "classifier"
    for required in (MODEL, LABELS) if classifier else (MODEL,):
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
    if not classifier:
        m["labels"] = []
        return m
    labels = read_labels(folder / LABELS)
    if m["outputs"] and m["outputs"][0]["shape"][-1] != len(labels):
        raise PMError(
            f"{folder / LABELS}: {len(labels)} labels, but the model scores {m['outputs'][0]['shape'][-1]}"
        )
    m["labels"] = labels
    return m


def write_probe(
    folder: Path, input_kind: str, inputs: list, scores: np.ndarray, tolerance: float, output: str = "scores"
) -> dict:
    """probe.json: raw inputs (texts, or images as nested lists of uint8 RGB) and their reference outputs (under
    "scores" whatever the output is, so every reader reads one key); returns the manifest's "probe" entry."""
    rows = [x if input_kind == "text" else np.asarray(x, np.uint8).tolist() for x in inputs]
    probe = {
        "input_kind": input_kind,
        "inputs": rows,
        "output": output,
        "scores": np.asarray(scores, np.float32).tolist(),
        "tolerance": tolerance,
        "reference": f"PyTorch fp32 {output} of the model at export",
    }
    (Path(folder) / PROBE).write_text(json.dumps(probe))
    return {"file": PROBE, "inputs": len(rows), "tolerance": tolerance, "reference": probe["reference"]}


def read_probe(folder: Path, manifest: dict) -> dict | None:
    """The probe as {"inputs": raw model inputs, "scores": [n, classes or dim] float32, "tolerance"}, or None for a
    bundle exported before probes existed."""
    if "probe" not in manifest:
        return None
    path = Path(folder) / manifest["probe"].get("file", PROBE)
    p = read_json(path)
    try:
        scores = np.asarray(p["scores"], np.float32)
        inputs = p["inputs"]
        if manifest["input_kind"] != "text":
            inputs = [np.asarray(x, np.uint8) for x in inputs]
        tolerance = float(p["tolerance"])
    except (KeyError, TypeError, ValueError) as e:
        raise PMError(f"{path}: not a probe file ({type(e).__name__}: {e})") from None
    if scores.ndim != 2 or len(scores) != len(inputs) or not inputs:
        raise PMError(f"{path}: {len(inputs)} inputs but scores of shape {list(scores.shape)}")
    return {"inputs": inputs, "scores": scores, "tolerance": tolerance}
