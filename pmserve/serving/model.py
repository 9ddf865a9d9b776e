"""A bundle as the server holds it (`Served`), and the checks every bundle passes before it serves (`load_bundle`):
its files' hashes, an ONNX Runtime session, and the bundle's parity probe. The same checks guard a server's first
models and every version a repository swaps in later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import defaults as D
from ..backbone import Preprocessor
from ..errors import PMError
from ..formats.bundle import read_manifest, read_probe, require_encoder, verify_bundle
from ..predict import OrtModel
from .config import ServeConfig

VERSION = "1"  # a bundle served as BUNDLE is one immutable model: version 1
# Export measures the probe's tolerance on the CPU. A GPU's fp32 may run matrix products in TF32 (ORT's CUDA
# provider can), whose mantissa is fp16's, so there the probe allows at least fp16's parity tolerance.
GPU_PROBE_TOL = 1e-2


@dataclass
class Served:
    """One loaded bundle under its model name and version."""

    name: str
    path: Path
    model: OrtModel
    version: str = VERSION

    @property
    def kind(self) -> str:
        return self.model.input_kind

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def embedding(self) -> bool:
        return self.model.kind == "embedding"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The v2 outputs a request may ask for."""
        return ("embedding",) if self.embedding else ("label", "scores")

    def metadata(self) -> dict:
        """The v2 model metadata; `parameters.labels` names the columns of `scores` (a classifier), and
        `parameters.kind` says whether the model classifies or embeds."""
        m = self.model.manifest
        if self.embedding:
            dim = m["outputs"][0]["shape"][-1]
            outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]
            params = {"kind": "embedding", "dim": dim, "pooling": m.get("pooling")}
            params["normalize"] = bool(m.get("normalize"))
        else:
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, len(self.labels)]},
            ]
            params = {"kind": "classifier", "labels": self.labels}
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.kind, "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs,
            "parameters": {**params, "providers": self.model.providers},
        }


def load_bundle(path: Path, name: str, cfg: ServeConfig, version: str = VERSION) -> Served:
    """A bundle verified against its manifest's hashes, opened, and run on its parity probe (or, for a bundle
    exported before probes, run once): a bundle that cannot serve, or does not score as it did at export, is a
    PMError here, before any request reaches it."""
    path = Path(path)
    read_manifest(path)  # "not a bundle" in the bundle's words before anything else
    # checks every file's sha256; no spinning: ORT's idle threads would take the cores requests are parsed on
    model = OrtModel.from_bundle(path, cfg.provider, cfg.threads, spinning=False)
    probe = read_probe(path, model.manifest)
    try:
        scores = model.scores(_probe_inputs(model.input_kind, probe))
    except Exception as e:  # noqa: BLE001 -- any failure here means the bundle cannot serve
        raise PMError(f"{path}: the model does not run ({str(e).splitlines()[0][:200]})") from None
    if probe is not None:
        if scores.shape != probe["scores"].shape:
            raise PMError(
                f"{path}: parity probe: scores of shape {list(scores.shape)}, export recorded "
                f"{list(probe['scores'].shape)}"
            )
        diff = float(np.abs(scores - probe["scores"]).max())
        tol = probe["tolerance"]
        if model.providers[0] != "CPUExecutionProvider":
            tol = max(tol, GPU_PROBE_TOL)
        if not diff <= tol:  # NaN fails too
            raise PMError(
                f"{path}: parity probe failed: max |score - export's PyTorch score| = {diff:.3g} "
                f"(tolerance {tol:g})"
            )
    return Served(name, path, model, version)


def _probe_inputs(kind: str, probe: dict | None) -> list:
    """The inputs a bundle is checked on: its parity probe's, or one plain input for a bundle from before probes."""
    if probe is None:
        return ["warm up"] if kind == "text" else [np.zeros((16, 16, 3), np.uint8)]
    return probe["inputs"]


def probe_feed(path: Path) -> dict[str, np.ndarray]:
    """The graph's inputs for the bundle's probe, encoded by its preprocessor once its files' hashes are checked
    (a PMError otherwise): what pmserve.serving.candidate runs the graph on in a child process, so that this
    process never opens a graph that has not run once elsewhere."""
    path = Path(path)
    m = verify_bundle(path)
    require_encoder(path, m)
    prep = Preprocessor(path, m["input_kind"], int(m.get("max_length", D.UNKNOWN_MAX_LENGTH)))
    batch = prep(_probe_inputs(m["input_kind"], read_probe(path, m)))
    return {k: v.numpy() for k, v in batch.items()}


def load_models(bundles: list[Path], names: list[str], cfg: ServeConfig) -> list[Served]:
    """Every bundle loaded (`load_bundle`) before the server listens, so that a bundle that cannot serve stops
    the server rather than failing its first request."""
    cfg.check()
    if names and len(names) != len(bundles):
        raise PMError(
            f"--name: given {len(names)} times for {len(bundles)} bundles (once per bundle, or never)"
        )
    names = names or [Path(b).resolve().name for b in bundles]
    seen = set()
    for n in names:
        if not n or "/" in n or n in seen:
            raise PMError(f"--name: {n!r} is empty, has a '/', or names two bundles (use --name per bundle)")
        seen.add(n)
    return [load_bundle(Path(path), name, cfg) for path, name in zip(bundles, names)]
