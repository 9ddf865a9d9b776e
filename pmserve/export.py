"""`pmserve export`: a model (RUN, merge output, Hugging Face folder) -> a deployable ONNX bundle, parity-checked.

The graph is the whole InferenceModel: the backbone with W_hat baked into its weights (no LoRA ops), the pooling
(mean over real tokens for text, [CLS] for images) and the inference classifier (linear / cosine rows, prototypes,
or ridge's random ReLU projection and weights), so it maps input_ids/attention_mask[/token_type_ids] (or
pixel_values) to `scores` [batch, classes] over every label seen, with dynamic batch and sequence axes.
Models made elsewhere go through the same path (formats.merged reads them): a *ForSequenceClassification /
*ForImageClassification keeps its own head in the graph (`scores`: its logits, or their softmax, the default for
single-label heads because a user reads a score as a probability, as transformers' pipelines give it); a bare or
sentence-transformers encoder ends in its pooling and normalisation (`embedding` [batch, dim]); a merge's delta
or adapter is applied to its base (adapters.apply_delta) before tracing.

Choices, and why:
- The TorchScript-based exporter (torch.onnx.export(dynamo=False)) with eager attention: ONNX Runtime's
  transformer optimizer recognises the attention it writes and fuses it into one Attention op (and the
  embeddings into EmbedLayerNormalization). The graph the dynamo exporter writes gets no attention fusion.
- Optimisation = onnxruntime.transformers.optimizer for BERT-like and ViT models, by default for fp16 (GPU)
  bundles only. On CPUs the fused graph measured slower than the plain one (BENCHMARKS.md, against Optimum:
  fp32 2 to 10% slower over 6 shapes, int8 6 to 26%, since quantising a fused Attention leaves its inner
  products in fp32), so fp32 and int8 bundles keep the traced graph and ONNX Runtime's own load-time fusions;
  `--optimize` asks for the fusion anyway. Where it fuses no attention (an unusual architecture) the bundle gets
  ONNX Runtime's provider-independent basic graph optimisation instead, and the manifest says so.
- fp16 (for GPUs) converts the backbone and keeps the classifier in fp32 (ridge weights can exceed fp16's range);
  inputs and the `scores` output keep their types.
- int8 = dynamic quantisation of the fp32 graph for CPUs. Its parity cannot meet 1e-4, so the fp32
  graph is checked first and the int8 one is reported: score difference, top-1 agreement, and the accuracy drop on
  the source's test sets.
- Parity: ONNX Runtime (CPU) against the PyTorch fp32 merged model on test inputs of the source's tasks (when
  known), generic sentences, and random token ids at other batch and sequence sizes; a failure leaves no bundle.
  Classifiers must also agree on every top-1; embeddings on direction too (cosine >= 0.9999 for every input).
- A probe (probe.json: a few inputs and their PyTorch scores, with the tolerance above; for int8 twice the
  difference measured at export) travels with the bundle, so a server checks the bundle it loads gives the
  scores export saw, through the same preprocessing, before it serves it.
- Everything is written into a temporary folder beside BUNDLE and renamed at the end. `export_version` writes
  the bundle as the next numbered version of a model folder in a repository (formats.repository), the same way.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import defaults as D
from .errors import PMError
from .formats import atomic_dir, check_new_out
from .formats import run as run_files
from .formats.bundle import MODEL, write_labels, write_manifest, write_probe
from .formats.merged import MergedSource, inspect_merged, source_hashes
from .formats.repository import check_model_dir, new_version
from .merged_model import InferenceModel, load_inference_model, saved_rejection
from .onnx_trace import export_graph, move_graph

DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8", "int4")  # int4: decoders only (decoder_export)
GRAPHS = ("auto", "traced", "genai")  # a decoder's graph (decoder_export.choose_graph)
PARITY_TOL = {"fp32": 1e-4, "fp16": 1e-2}
MIN_COSINE = 0.9999  # embeddings: every ONNX Runtime row points where PyTorch's does
OPSETS = range(14, 21)  # what the TorchScript-based exporter writes (and the transformer optimizer reads)
SAMPLE_TEXTS = [
    "a",
    "the quick brown fox jumps over the lazy dog",
    "An old map of the river, the hills and the small town beside the lake.",
    "time flies",
    "pmserve exports merged models to ONNX Runtime; parity is checked against PyTorch on every export.",
]


@dataclass
class ExportOptions:
    dtype: str = D.EXPORT_DTYPE
    opset: int = D.EXPORT_OPSET
    optimize: bool | None = D.EXPORT_OPTIMIZE  # None: fused for fp16 (GPUs), not for fp32 and int8 (CPUs)
    quantize: str | None = D.EXPORT_QUANTIZE  # None, "int8", or "int4" (a decoder)
    block_size: int = D.EXPORT_BLOCK_SIZE  # int4: weights per quantisation block
    graph: str = D.EXPORT_GRAPH  # a decoder's graph: auto, traced (causal_lm) or genai (GenAI's builder)
    data: str | None = D.EXPORT_DATA  # task sequence for the int8 accuracy report; default: the source's own
    max_length: int | None = D.EXPORT_MAX_LENGTH  # tokenizer truncation; default: the source's
    base: str | None = D.EXPORT_BASE  # the base model of a merge's delta or adapter
    scores: str | None = D.EXPORT_SCORES  # a model's own head: logits | softmax
    pooling: str | None = D.EXPORT_POOLING  # an embedding model: mean | cls | max
    normalize: bool | None = D.EXPORT_NORMALIZE  # an embedding model: L2-normalise

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise PMError(f"--dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.opset not in OPSETS:
            raise PMError(f"--opset: must be in {OPSETS.start}..{OPSETS.stop - 1}, got {self.opset}")
        if self.quantize not in (None, *QUANTIZATIONS):
            raise PMError(f"--quantize: must be int8 or int4, got {self.quantize!r}")
        if self.quantize and self.dtype == "fp16":
            raise PMError(f"--quantize {self.quantize}: quantises the fp32 graph; use it with --dtype fp32")
        if self.graph not in GRAPHS:
            raise PMError(f"--graph: must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise PMError(f"--block-size: must be a power of two >= 16, got {self.block_size}")
        if self.max_length is not None and self.max_length < 2:
            raise PMError(f"--max-length: must be at least 2, got {self.max_length}")


def export_bundle(
    source: Path | str, out: Path | str, opts: ExportOptions | None = None, log=lambda *_: None
) -> dict:
    """Export SOURCE (a RUN, a Hugging Face model folder, a merge's delta or adapter) to the bundle folder OUT;
    returns its manifest."""
    opts = opts or ExportOptions()
    opts.validate()
    out = Path(out)
    check_new_out(out)
    write = _prepare(source, opts, log)
    with atomic_dir(out) as tmp:
        return write(tmp)


def export_version(
    source: Path | str, model_dir: Path | str, opts: ExportOptions | None = None, log=lambda *_: None
) -> tuple[Path, dict]:
    """Export SOURCE as the next version of the repository model folder MODEL_DIR (made when missing):
    MODEL_DIR/1, /2, ...; returns the version's folder and its manifest. No finished version is overwritten."""
    opts = opts or ExportOptions()
    opts.validate()
    model_dir = Path(model_dir)
    check_model_dir(model_dir)  # before the model is loaded: bad input costs nothing
    write = _prepare(source, opts, log)
    with new_version(model_dir) as (version, tmp):
        manifest = write(tmp)
    return model_dir / str(version), manifest


def _prepare(source, opts: ExportOptions, log):
    """Load SOURCE and its parity inputs; returns the function that writes the bundle into a folder."""
    from .causal_lm import is_causal_lm

    if is_causal_lm(source):  # a decoder LM: the KV-cache graph and its own gate (decoder_export)
        from .decoder_export import DecoderExport

        for name, value in (("--base", opts.base), ("--scores", opts.scores), ("--pooling", opts.pooling)):
            if value:
                raise PMError(f"{name}: does not apply to a decoder language model")
        return DecoderExport(source, opts, log).write
    if opts.quantize == "int4":
        raise PMError("--quantize int4: for decoder language models only (use int8 for this model)")
    if opts.graph == "genai":
        raise PMError("--graph genai: for decoder language models only")
    src = inspect_merged(source, base=opts.base)
    for note in src.configure(opts.scores, opts.pooling, opts.normalize):
        log(f"note: {note}")
    if opts.max_length:
        src.max_length = opts.max_length
    model, prep = load_inference_model(src, attn="eager")
    tasks, note = _tasks(
        opts.data or src.data, src.seed, required=bool(opts.data), run=None if opts.data else src
    )
    if note:
        log(f"note: {note}")
    batches = parity_batches(model, prep, tasks, src.max_length)
    return lambda tmp: _export_into(tmp, src, model, prep, batches, tasks, note, opts, log)


def _export_into(tmp, src, model, prep, batches, tasks, tasks_note, opts: ExportOptions, log) -> dict:
    work = tmp / ".work"
    work.mkdir()
    raw = work / "raw.onnx"
    log(f"exporting {src.path} ({src.summary()}) to ONNX")
    trace_onnx(model, batches[0], raw, opts.opset)
    current, optimization = raw, {"method": None}
    if opts.optimize if opts.optimize is not None else opts.dtype == "fp16":
        current, optimization = optimize_graph(raw, work, model, src.input_kind, use_gpu=opts.dtype == "fp16")
        log(
            f"optimised: {optimization['method']}"
            + (f" ({optimization['note']})" if "note" in optimization else "")
        )
    if opts.dtype == "fp16":
        current = to_fp16(current, work / "fp16.onnx")
    parity = check_parity(current, model, batches, PARITY_TOL[opts.dtype])
    log(f"parity ({opts.dtype}): {_agreement(parity)}")
    if not parity["passed"]:
        raise PMError(f"parity check failed: {_agreement(parity)}; no bundle written")
    quantization = None
    if opts.quantize == "int8":
        q = work / "int8.onnx"
        quantize_int8(current, q)
        quantization = {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8",
            "parity_vs_pytorch": check_parity(q, model, batches, None),
            "accuracy": int8_accuracy(current, q, prep, src, tasks),
        }
        current = q
        acc = quantization["accuracy"]
        log(
            f"int8: {_agreement(quantization['parity_vs_pytorch'])}; "
            + (
                f"accuracy {acc['fp32']['mean']:.4f} -> {acc['int8']['mean']:.4f} (drop {acc['drop']:.4f})"
                if "drop" in acc
                else acc["note"]
            )
        )
    probe = _probe(current, model, prep, src, tasks, opts)
    move_graph(current, tmp / MODEL)
    shutil.rmtree(work)
    prep.save(tmp)
    if src.output == "classifier":
        write_labels(tmp, src.labels)
    cfg = model.encoder.model.config
    return write_manifest(
        tmp,
        {
            "source": {**src.describe(), "sha256": source_hashes(src)},
            "kind": src.output,
            "alphas": src.alphas,
            "input_kind": src.input_kind,
            "max_length": src.max_length,
            "max_positions": getattr(cfg, "max_position_embeddings", None),
            "model_type": cfg.model_type,
            "classes": len(src.labels),
            "labels": src.labels,
            "head": src.head,
            "reject": saved_rejection(src),
            "scores": src.scores,
            "pooling": src.pooling,
            "normalize": src.normalize,
            "pooling_from": src.pooling_from,
            "dtype": opts.dtype,
            "opset": opts.opset,
            "exporter": f"torch.onnx TorchScript exporter, torch {torch.__version__}",
            **graph_io(tmp / MODEL),
            "optimization": optimization,
            "quantization": quantization,
            "parity": {**parity, "inputs": _parity_inputs(tasks, tasks_note)},
            "probe": write_probe(
                tmp, src.input_kind, probe["inputs"], probe["scores"], probe["tolerance"], model.output
            ),
            "versions": _versions(),
        },
    )


# ---------------------------------------------------------------- steps


def trace_onnx(model: InferenceModel, batch: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    """The InferenceModel as ONNX with batch (and sequence) axes dynamic and its outputs: `scores` or
    `embedding` (model.output), then `fit` [batch] for a classifier that rejects by fit."""
    names = model.input_names
    axes = {n: ({0: "batch", 1: "sequence"} if n != "pixel_values" else {0: "batch"}) for n in names}
    axes |= {o: {0: "batch"} for o in model.outputs}
    export_graph(
        model,
        tuple(batch[n] for n in names),
        path,
        names,
        model.outputs,
        axes,
        opset,
        model.encoder.model.config.model_type,
    )
    with torch.no_grad():
        width = int(model.scores(batch).shape[1]) - model.has_fit
    _static_width(path, model.output, width)


def _static_width(path: Path, output: str, width: int) -> None:
    """The output's second axis as the number it is (classes or dimension): the exporter can leave it symbolic
    (a pooling's masked sum), and clients and the manifest read the width from the graph."""
    import onnx

    from .onnx_trace import save_graph

    m = onnx.load(str(path))
    (out,) = [o for o in m.graph.output if o.name == output]
    dim = out.type.tensor_type.shape.dim[1]
    if dim.dim_value != width:
        dim.dim_value = width  # clears dim_param
        save_graph(m, path)


def optimize_graph(raw: Path, work: Path, model: InferenceModel, input_kind: str, use_gpu: bool):
    """(path, report): transformer fusions where they apply, else ORT's basic graph optimisation with a note."""
    from onnxruntime.transformers import optimizer

    cfg = model.encoder.model.config
    model_type = "vit" if input_kind == "image" else "bert"
    dst = work / "optimized.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimizer.optimize_model(
                str(raw),
                model_type=model_type,
                num_heads=int(cfg.num_attention_heads),
                hidden_size=int(cfg.hidden_size),
                opt_level=0,
                use_gpu=use_gpu,
            )
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        if not fused.get("Attention") and not fused.get("MultiHeadAttention"):
            reason = "it fused no attention"
        else:
            opt.save_model_to_file(str(dst))
            return dst, {
                "method": "onnxruntime.transformers.optimizer",
                "model_type": model_type,
                "fused": fused,
            }
    except Exception as e:  # noqa: BLE001 -- any failure of the fusion pass falls back below
        reason = f"it failed: {str(e).splitlines()[0][:160]}"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
    return dst, {
        "method": "onnxruntime graph optimisation (basic, provider-independent)",
        "note": f"transformer fusion not used ({model_type}: {reason}); ORT fuses at load time",
    }


def to_fp16(
    path: Path,
    dst: Path,
    keep_io_types: bool | list[str] = True,
    keep_prefix: str | None = "/classifier/",
) -> Path:
    """The graph in fp16 (weights and activations), except the nodes whose names start with KEEP_PREFIX and the
    inputs / outputs KEEP_IO_TYPES keeps in their types (True: all of them; a list: those named). An encoder keeps
    its classifier and every input and output in fp32; a decoder (decoder_export) keeps `logits` only, so its
    KV cache is fp16 too. The pooling runs in fp16: blocking its nodes too makes the converter write two Cast
    nodes of one name where a tensor feeds two of them; an embedding that overflowed fp16 would fail the parity
    gate, never reach a bundle.

    Through OnnxModel, whose symbolic shape inference types the fused contrib ops the converter must see; saved
    by onnx_trace.save_graph (external data past 2 GB)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from .onnx_trace import save_graph

    m = OnnxModel(onnx.load(str(path)))
    keep = [n.name for n in m.model.graph.node if keep_prefix and n.name.startswith(keep_prefix)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.convert_float_to_float16(keep_io_types=keep_io_types, node_block_list=keep)
    m.topological_sort()
    save_graph(m.model, dst)
    return dst


def quantize_int8(path: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights (activations quantised at run time), for CPUs."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on pre-processing that does not apply here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(path),
                str(dst),
                weight_type=QuantType.QInt8,
                # shape inference cannot type the outputs of fused contrib ops (Attention, SkipLayerNorm)
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------- checks


def parity_batches(
    model: InferenceModel, prep, tasks: list | None, max_length: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Inputs to compare ONNX Runtime and PyTorch on, of several batch and sequence sizes, padding included."""
    g = torch.Generator().manual_seed(seed)
    if model.input_names == ["pixel_values"]:
        real = [x for t in tasks or [] for x in t.test.inputs[:4]][:16]
        batches = [prep(real)] if real else []
        for b in (2, 1):
            imgs = torch.randint(0, 256, (b, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            batches.append(prep(list(imgs)))
        return batches
    real = [x for t in tasks or [] for x in t.test.inputs[:8]][:32]
    batches = [prep(real[k : k + 16]) for k in range(0, len(real), 16)]
    batches += [prep(SAMPLE_TEXTS), prep(SAMPLE_TEXTS[2:3])]
    # random tokens at a length the texts may not reach, one row half padding
    vocab = int(model.encoder.model.config.vocab_size)
    n = max(2, min(max_length, 48))
    ids = torch.randint(min(1000, vocab // 2), vocab, (3, n), generator=g)
    rand = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rand["attention_mask"][1, n // 2 :] = 0
    if "token_type_ids" in model.input_names:
        rand["token_type_ids"] = torch.zeros_like(ids)
    batches.append(rand)
    return batches


@torch.no_grad()
def check_parity(path: Path, model: InferenceModel, batches, tol: float | None) -> dict:
    """ONNX Runtime (CPU) against PyTorch over every batch: the max |output difference|, and top-1 mismatches
    (classifiers) or the smallest cosine between the rows (embeddings); passed iff within tol and agreeing."""
    from .predict import ort_rows, ort_session

    sess = ort_session(path, "cpu")
    names = [i.name for i in sess.get_inputs()]
    embedding = model.output == "embedding"
    scores = slice(None, -1 if model.has_fit else None)  # the class scores of a row (the fit is compared too)
    diff, mismatches, samples, cosine = 0.0, 0, 0, 1.0
    for b in batches:
        ref = model.scores(b).float().numpy()
        got = ort_rows(sess, model.outputs, {n: b[n].numpy() for n in names})
        diff = max(diff, float(np.abs(ref - got).max()))
        if embedding:
            cosine = min(cosine, float(_cosines(ref, got).min()))
        else:
            mismatches += int((ref[:, scores].argmax(1) != got[:, scores].argmax(1)).sum())
        samples += len(ref)
    out = {"max_abs_diff": diff, "samples": samples, "provider": "CPUExecutionProvider"}
    if embedding:
        out["min_cosine"] = cosine
    else:
        out.update(top1_mismatches=mismatches, top1_agreement=1 - mismatches / samples)
    if tol is not None:
        out["tolerance"] = tol
        agree = cosine >= MIN_COSINE if embedding else mismatches == 0
        out["passed"] = diff <= tol and agree
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64 (two zero rows agree)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(1)
    return np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, 1e-300))


def _agreement(parity: dict) -> str:
    """One line on how ONNX Runtime agreed with PyTorch."""
    tol = f" (tolerance {parity['tolerance']:g})" if "tolerance" in parity else ""
    line = f"max |ONNX Runtime - PyTorch| = {parity['max_abs_diff']:.3g}{tol}"
    if "min_cosine" in parity:
        return (
            line
            + f", min cosine {parity['min_cosine']:.6f} (>= {MIN_COSINE}) over {parity['samples']} inputs"
        )
    return line + f", top-1 differs on {parity['top1_mismatches']} of {parity['samples']} inputs"


@torch.no_grad()
def _probe(path: Path, model: InferenceModel, prep, src: MergedSource, tasks, opts: ExportOptions) -> dict:
    """Probe inputs (generic texts and a few test inputs, or seeded random images), their PyTorch outputs (scores
    or embeddings), and the tolerance a server holds the bundle to on them: the parity tolerance of the dtype; for
    int8 (which cannot meet it) twice the difference measured here, through the same preprocessing the server
    uses."""
    from .predict import OrtModel

    if src.input_kind == "text":
        inputs = SAMPLE_TEXTS + [x for t in tasks or [] for x in t.test.inputs[:1]][:3]
    else:
        g = np.random.default_rng(0)
        inputs = list(g.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    ref = model.scores(prep(inputs)).float().numpy()
    got = OrtModel(path, prep, model.labels, src.input_kind, "cpu").scores(inputs)
    diff = float(np.abs(ref - got).max())
    if opts.quantize == "int8":
        tolerance = max(2 * diff, PARITY_TOL["fp32"])
    else:
        tolerance = PARITY_TOL[opts.dtype]
        if diff > tolerance:  # the parity gate passed on the same graph: only preprocessing can differ here
            raise PMError(
                f"probe: max |ONNX Runtime - PyTorch| = {diff:.3g} on raw inputs (tolerance {tolerance:g}); "
                "no bundle written"
            )
    return {"inputs": inputs, "scores": ref, "tolerance": tolerance}


def _tasks(
    data: str | None, seed: int, required: bool, run: MergedSource | None = None
) -> tuple[list | None, str | None]:
    """The test sets the int8 report and parity inputs use, and a note when the source's are not readable here
    (then parity runs on generic inputs only, and the manifest says so); a --data that fails is an error.
    A RUN's own record comes first: the test sets it kept (its data folders may be long gone)."""
    if run is not None and run.kind == "run" and run_files.read_plan(run.path):
        from .train import run_tests

        kept = [t for t in run_tests(run.path) if t.test is not None]
        if kept:
            return kept, None
    if not data:
        return None, "the source names no task data: parity checked on generic inputs only"
    from .tasks import load_tasks

    try:
        return load_tasks(data, seed), None
    except PMError as e:
        if required:
            raise
        return (
            None,
            f"the source's task data is not readable here ({e}): parity checked on generic inputs only",
        )


def _parity_inputs(tasks: list | None, note: str | None) -> dict:
    """What the parity batches were drawn from, for the manifest."""
    if tasks:
        return {"tasks": [t.name for t in tasks], "generic": True}
    return {"tasks": [], "generic": True, "note": note}


def int8_accuracy(fp32: Path, int8: Path, prep, src: MergedSource, tasks) -> dict:
    """Accuracy of the fp32 and int8 graphs on the source's test sets (classifiers with known test sets)."""
    if src.output == "embedding":
        return {
            "note": "an embedding model has no accuracy: its parity above (difference, cosine) is the report"
        }
    if not tasks:
        return {
            "note": "accuracy not measured: the source records no test sets that exist here (pass --data)"
        }
    from .predict import OrtModel, evaluate_model

    res = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        res[name] = evaluate_model(OrtModel(path, prep, src.labels, src.input_kind, "cpu"), tasks)
    res["drop"] = res["fp32"]["mean"] - res["int8"]["mean"]
    res["data"] = src.data
    return res


def graph_io(path: Path) -> dict:
    """The graph's input and output names, element types and shapes (symbolic axes by name)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": dims,
        }

    return {"inputs": [describe(v) for v in m.graph.input], "outputs": [describe(v) for v in m.graph.output]}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    from . import __version__

    return {
        "pmserve": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
