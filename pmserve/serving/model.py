"""A bundle as the server holds it (`Served`), and the checks every bundle passes before it serves (`load_bundle`):
its files' hashes, an ONNX Runtime session, and the bundle's parity probe. The same checks guard a server's first
models and every version a repository swaps in later, encoders (an OrtModel) and decoders (a generation.Generator)
alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import defaults as D
from ..backbone import Preprocessor
from ..errors import PMError
from ..formats.bundle import bundle_kind, read_manifest, read_probe, verify_bundle
from ..generation import Generator
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
    model: OrtModel | Generator
    version: str = VERSION

    @property
    def causal(self) -> bool:
        """A decoder (causal-lm): generated from through the generate and OpenAI routes, not the infer route."""
        return isinstance(self.model, Generator)

    @property
    def kind(self) -> str:
        """The input kind (text or image): what bounds a request's body."""
        return "text" if self.causal else self.model.input_kind

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def embedding(self) -> bool:
        return not self.causal and self.model.kind == "embedding"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The v2 outputs a request may ask for."""
        return ("embedding",) if self.embedding else ("label", "scores")

    def metadata(self) -> dict:
        """The v2 model metadata; `parameters.labels` names the columns of `scores` (a classifier), and
        `parameters.kind` says whether the model classifies, embeds or generates (the generate extension's
        text_input and text_output)."""
        if self.causal:
            return {
                "name": self.name,
                "versions": [self.version],
                "platform": "onnxruntime_onnx",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
                "parameters": {
                    "kind": "causal-lm",
                    "chat_template": bool(getattr(self.model.tokenizer, "chat_template", None)),
                    "providers": self.providers,
                },
            }
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
            "parameters": {**params, "providers": self.providers},
        }


def load_bundle(path: Path, name: str, cfg: ServeConfig, version: str = VERSION) -> Served:
    """A bundle verified against its manifest's hashes, opened, and run on its parity probe (or, for a bundle
    exported before probes, run once): a bundle that cannot serve, or does not score as it did at export, is a
    PMError here, before any request reaches it."""
    path = Path(path)
    manifest = read_manifest(path)  # "not a bundle" in the bundle's words before anything else
    if bundle_kind(manifest) == "causal-lm":
        return Served(name, path, load_decoder_bundle(path, cfg), version)
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


def load_decoder_bundle(path: Path, cfg: ServeConfig) -> Generator:
    """A decoder bundle verified (hashes), opened, and run on its probe: the logits after each probe prompt within
    the probe's tolerance of PyTorch's at export and, for an fp32 graph (not fp16, not quantised), greedy
    generation giving exactly the tokens Hugging Face generate gave then (pmserve.decoder_export's gate, replayed
    on the machine that serves)."""
    m = verify_bundle(path)
    gen = Generator.from_bundle(path, cfg.provider, cfg.threads, spinning=False)
    probe = read_probe(path, m)
    if probe is None:
        raise PMError(f"{path}: a decoder bundle without a parity probe (export it again)")
    rows = [gen.encode(p) for p in probe["inputs"]]
    try:
        logits = [gen.decoder.prefill([r], gen.pad_id)[0][0] for r in rows]
    except Exception as e:  # noqa: BLE001 -- any failure here means the bundle cannot serve
        raise PMError(f"{path}: the model does not run ({str(e).splitlines()[0][:200]})") from None
    logits = np.stack(logits)
    if logits.shape != probe["scores"].shape:
        raise PMError(
            f"{path}: parity probe: logits of shape {list(logits.shape)}, export recorded "
            f"{list(probe['scores'].shape)}"
        )
    diff = float(np.abs(logits - probe["scores"]).max())
    cpu = gen.providers[0] == "CPUExecutionProvider"
    tol = probe["tolerance"] if cpu else max(probe["tolerance"], GPU_PROBE_TOL)
    if not diff <= tol:  # NaN fails too
        raise PMError(
            f"{path}: parity probe failed: max |logit - export's PyTorch logit| = {diff:.3g} (tolerance {tol:g})"
        )
    want = m["probe"].get("greedy_tokens")
    exact = m.get("dtype", "fp32") == "fp32" and not m.get("quantization")
    if want and exact and cpu and gen.greedy(rows, max(map(len, want))) != want:
        raise PMError(
            f"{path}: parity probe failed: greedy tokens differ from Hugging Face generate's at export"
        )
    return gen


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
    probe = read_probe(path, m)
    if bundle_kind(m) == "causal-lm":  # the probe prompts, left-padded, with an empty cache
        from transformers import AutoTokenizer

        from ..generation import generation_ids, prompt_feed

        tok = AutoTokenizer.from_pretrained(str(path))
        rows = [list(tok(p)["input_ids"]) for p in (probe or {"inputs": ["warm up"]})["inputs"]]
        return prompt_feed(m, rows, generation_ids(path, tok)[1])
    prep = Preprocessor(path, m["input_kind"], int(m.get("max_length", D.UNKNOWN_MAX_LENGTH)))
    batch = prep(_probe_inputs(m["input_kind"], probe))
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
