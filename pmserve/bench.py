"""`pmserve bench`: inference latency of one merged model served four ways, side by side in one run.

Backends, all scoring the same synthetic inputs (random token ids, full attention mask) per shape:
- `onnxruntime`: the bundle's model.onnx (a MERGED folder is exported to a temporary bundle first); on CUDA the
  inputs and the output are bound on the GPU with IOBinding, so host copies are not timed;
- `torch-merged`: the same merged model in PyTorch eager (fp16 on CUDA when the bundle is fp16);
- `torch-base`: the pretrained W_0 with the same classifier: merging adds no parameters, so this is the latency
  the merged model should match;
- `peft-unmerged`: W_0 plus every task's LoRA branch, loaded with plain PEFT as separate adapters all active at
  once, each scaled by its alpha (merged_model.load_unmerged_model): what serving without the merge costs.
Calls are interleaved (each timed round runs every backend once, in a random order), so load from elsewhere on
the machine hits all backends alike. Both runtimes use the same number of CPU threads.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import defaults as D
from .errors import PMError
from .formats.bundle import MODEL, is_bundle, read_manifest, verify_bundle
from .formats.merged import MergedSource, inspect_merged
from .merged_model import InferenceModel, load_base_model, load_inference_model, load_unmerged_model

BACKENDS = ("onnxruntime", "torch-merged", "torch-base", "peft-unmerged")


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: list(D.BENCH_BATCH_SIZES))
    seq_lens: list[int] = field(default_factory=lambda: list(D.BENCH_SEQ_LENS))
    warmup: int = D.BENCH_WARMUP
    runs: int = D.BENCH_RUNS
    provider: str = D.BENCH_PROVIDER  # cpu | cuda
    threads: int = D.BENCH_THREADS  # CPU threads for both runtimes; 0 = PyTorch's default
    backends: list[str] = field(default_factory=lambda: list(D.BENCH_BACKENDS))
    seed: int = D.BENCH_SEED
    new_tokens: int = D.BENCH_NEW_TOKENS  # a decoder bundle: tokens generated per prompt
    # more bundles of the same model to time beside the others, as `onnxruntime-NAME` (e.g. {"int8": path})
    other_bundles: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        for opt, vals in (("batch-sizes", self.batch_sizes), ("seq-lens", self.seq_lens)):
            if not vals or any(v < 1 for v in vals):
                raise PMError(f"--{opt}: needs positive integers, got {','.join(map(str, vals)) or 'none'}")
        if self.warmup < 0:
            raise PMError(f"--warmup: must be >= 0, got {self.warmup}")
        if self.new_tokens < 2:
            raise PMError(f"--new-tokens: must be at least 2, got {self.new_tokens}")
        if self.runs < 1:
            raise PMError(f"--runs: must be at least 1, got {self.runs}")
        if self.provider not in ("cpu", "cuda"):
            raise PMError(f"--provider: must be cpu or cuda, got {self.provider!r}")
        if self.threads < 0:
            raise PMError(f"--threads: must be >= 0, got {self.threads}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise PMError(
                f"--backends: unknown {bad[0] if bad else 'none'!r} (choose from {', '.join(BACKENDS)})"
            )


class _Runner:
    """One backend: `prepare(feed)` puts a shape's inputs where the backend reads them; `call()` runs once."""

    def __init__(self, name: str, prepare, call, describe: str):
        self.name, self.prepare, self.call, self.describe = name, prepare, call, describe


def _ort_runner(onnx_path: Path, provider: str, threads: int, name: str = "onnxruntime") -> _Runner:
    import onnxruntime as ort

    from .predict import ort_session

    sess = ort_session(onnx_path, provider, threads)
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]  # scores or embedding, and fit where serving reads one
    state: dict = {}

    if provider == "cuda":

        def prepare(feed):
            io = sess.io_binding()
            vals = {n: ort.OrtValue.ortvalue_from_numpy(feed[n], "cuda", 0) for n in names}
            for n, v in vals.items():
                io.bind_ortvalue_input(n, v)
            for o in outputs:
                io.bind_output(o, "cuda")
            state.update(io=io, vals=vals)

        def call():
            sess.run_with_iobinding(state["io"])

    else:

        def prepare(feed):
            state["feed"] = {n: feed[n] for n in names}

        def call():
            sess.run(outputs, state["feed"])

    return _Runner(
        name, prepare, call, f"ONNX Runtime {ort.__version__}, {sess.get_providers()[0]}, {onnx_path}"
    )


def _torch_runner(name: str, model: InferenceModel, device: str, half: bool, describe: str) -> _Runner:
    model = model.to(device)
    if half:
        model = model.half()  # scores in fp16 too: this is the fp16 GPU comparison
    state: dict = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prepare(feed):
        args = [torch.from_numpy(feed[n]).to(device) for n in model.input_names]
        state["args"] = [a.half() if half and a.is_floating_point() else a for a in args]

    @torch.inference_mode()
    def call():
        model(*state["args"])
        sync()

    return _Runner(name, prepare, call, describe)


def _inputs(src_kind: str, input_names: list[str], b: int, s: int, vocab: int, image_size, g) -> dict:
    if src_kind == "image":
        return {"pixel_values": g.standard_normal((b, 3, *image_size), dtype=np.float32)}
    ids = g.integers(min(1000, vocab // 2), vocab, size=(b, s), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in input_names:
        feed["token_type_ids"] = np.zeros_like(ids)
    return feed


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(path: Path | str, cfg: BenchConfig | None = None, log=lambda *_: None) -> dict:
    """Time every backend on every (batch, sequence) shape; returns the results (also what --json writes)."""
    cfg = cfg or BenchConfig()
    cfg.validate()
    path = Path(path)
    if is_bundle(path) and read_manifest(path).get("kind") == "causal-lm":
        return _run_decoder(path, cfg, log)
    from .causal_lm import is_causal_lm

    if is_causal_lm(path):
        raise PMError(f"{path}: a decoder language model; `pmserve export` it, then bench the bundle")
    device = "cuda" if cfg.provider == "cuda" else "cpu"
    if device == "cuda" and any(b != "onnxruntime" for b in cfg.backends) and not torch.cuda.is_available():
        raise PMError("--provider cuda: PyTorch sees no CUDA device (use --backends onnxruntime)")
    notes: list[str] = []
    tmpdir = None
    src: MergedSource | None = None
    if is_bundle(path):
        manifest = verify_bundle(path)
        onnx_path = path / MODEL
        recorded = manifest.get("source", {})
        source_path = Path(recorded.get("path", ""))
        base = recorded.get("model") if recorded.get("kind") in ("delta", "adapter") else None
        try:
            src = inspect_merged(source_path, base=base) if str(source_path) else None
            if src is not None:  # the bundle's own choices, where export's options changed the source's
                src.scores = manifest.get("scores", src.scores)
                src.pooling = manifest.get("pooling", src.pooling)
                src.normalize = bool(manifest.get("normalize", src.normalize))
        except PMError as e:
            notes.append(f"PyTorch rows skipped: the bundle's source is not readable here ({e})")
        if src is None and not notes:
            notes.append("PyTorch rows skipped: the bundle records no source")
        dtype = manifest.get("dtype", "fp32")
    else:
        from .export import export_bundle

        src = inspect_merged(path)
        tmpdir = tempfile.TemporaryDirectory(prefix="pmserve-bench-")
        log(f"{path} is a merged model: exporting it to a temporary bundle for the onnxruntime rows")
        manifest = export_bundle(path, Path(tmpdir.name) / "bundle")
        onnx_path = Path(tmpdir.name) / "bundle" / MODEL
        dtype = "fp32"

    threads_before = torch.get_num_threads()
    threads = cfg.threads or threads_before
    half = device == "cuda" and dtype == "fp16"
    if dtype == "fp16" and device == "cpu":
        notes.append("fp16 bundle on CPU: the PyTorch rows run in fp32")
    try:
        torch.set_num_threads(threads)
        kind = manifest["input_kind"]
        input_names = [i["name"] for i in manifest["inputs"]]
        max_pos = manifest.get("max_positions")
        if kind == "text" and max_pos:
            too_long = [s for s in cfg.seq_lens if s > max_pos]
            if too_long:
                raise PMError(f"--seq-lens: {too_long[0]} is longer than the model's {max_pos} positions")
        runners = _make_runners(cfg, onnx_path, src, device, half, threads, notes, log)
        image_size = tuple(manifest["inputs"][0]["shape"][2:]) if kind == "image" else None
        vocab = _vocab_size(src, manifest)
        shapes = (
            [(b, s) for b in cfg.batch_sizes for s in cfg.seq_lens]
            if kind == "text"
            else [(b, None) for b in cfg.batch_sizes]
        )
        if kind == "image":
            notes.append("image model: --seq-lens does not apply")
        g = np.random.default_rng(cfg.seed)
        # a fresh random order every round, so no backend always runs right after another
        order = np.random.default_rng(cfg.seed + 1)
        block = D.BENCH_BLOCK
        results = []
        for b, s in shapes:
            feed = _inputs(kind, input_names, b, s or 0, vocab, image_size, g)
            for r in runners:
                r.prepare(feed)
            for _ in range(cfg.warmup):
                for r in runners:
                    r.call()
            times = {r.name: [] for r in runners}
            # Timed in blocks, one untimed call first: a call right after another backend's competes for the cores
            # with that backend's threads, which spin for a while after each call (ONNX Runtime's pool, PyTorch's
            # OpenMP team); timed call by call, every backend paid for its predecessor's spin.
            for left in range(cfg.runs, 0, -block):
                for j in order.permutation(len(runners)):
                    r = runners[j]
                    r.call()
                    for _ in range(min(block, left)):
                        t0 = time.perf_counter()
                        r.call()
                        times[r.name].append(time.perf_counter() - t0)
            for r in runners:
                ms = np.array(times[r.name]) * 1e3
                results.append(
                    {
                        "backend": r.name,
                        "batch": b,
                        "seq": s,
                        "p50_ms": float(np.percentile(ms, 50)),
                        "p90_ms": float(np.percentile(ms, 90)),
                        "p99_ms": float(np.percentile(ms, 99)),
                        "mean_ms": float(ms.mean()),
                        "throughput": float(b / (ms.mean() / 1e3)),
                        "n": len(ms),
                    }
                )
            log(
                f"batch {b}"
                + (f" seq {s}" if s else "")
                + ": "
                + ", ".join(f"{r['backend']} {r['p50_ms']:.2f} ms" for r in results[-len(runners) :])
            )
    finally:
        torch.set_num_threads(threads_before)
        if tmpdir is not None:
            tmpdir.cleanup()
    return {
        "model": str(path),
        "source": src.describe() if src else manifest.get("source"),
        "bundle_dtype": dtype,
        "config": asdict(cfg) | {"threads": threads},
        "device": _device_name(device),
        "backends": {r.name: r.describe for r in runners},
        "notes": notes,
        "results": results,
        "summary": summarize(results),
    }


def _run_decoder(path: Path, cfg: BenchConfig, log) -> dict:
    """A decoder bundle: TTFT and decode tokens/s (decoder_bench), in the same record as the encoder rows."""
    from .decoder_bench import run_decoder_bench

    if cfg.provider != "cpu":
        raise PMError("--provider cuda: decoder bundles are benchmarked on CPUs only so far")
    manifest = verify_bundle(path)
    threads_before = torch.get_num_threads()
    threads = cfg.threads or threads_before
    try:
        torch.set_num_threads(threads)
        res = run_decoder_bench(path, manifest, cfg, threads, log)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "model": str(path),
        "kind": "causal-lm",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source": manifest.get("source"),
        "bundle_quantization": (manifest.get("quantization") or {}).get("method"),
        "config": asdict(cfg) | {"threads": threads},
        "device": _device_name("cpu"),
        **res,
    }


def _make_runners(cfg, onnx_path, src, device, half, threads, notes, log) -> list[_Runner]:
    runners = []
    for name in cfg.backends:
        if name == "onnxruntime":
            runners.append(_ort_runner(onnx_path, cfg.provider, threads))
            continue
        if src is None:
            continue
        what = f"PyTorch {torch.__version__} eager, {device}{', fp16' if half else ''}"
        if name == "torch-merged":
            model, _ = load_inference_model(src)
            runners.append(_torch_runner(name, model, device, half, what + ", merged weights"))
        elif name == "torch-base":
            model = load_base_model(src)
            if model is None:
                notes.append("torch-base skipped: the source does not record its base model")
                continue
            runners.append(
                _torch_runner(name, model, device, half, what + f", base weights ({src.base_model})")
            )
        elif name == "peft-unmerged":
            model = load_unmerged_model(src)
            if model is None:
                notes.append(
                    "peft-unmerged skipped: the source has no task adapters (frozen run or full folder)"
                )
                continue
            n = len(src.adapter_dirs)
            runners.append(
                _torch_runner(name, model, device, half, what + f", base + {n} LoRA adapters active (PEFT)")
            )
    for label, bundle in cfg.other_bundles.items():
        verify_bundle(bundle)
        runners.append(_ort_runner(Path(bundle) / MODEL, cfg.provider, threads, f"onnxruntime-{label}"))
    if not runners:
        raise PMError("--backends: none of the asked backends can run on this model")
    log("backends: " + ", ".join(r.name for r in runners))
    return runners


def _vocab_size(src: MergedSource | None, manifest: dict) -> int:
    if src is not None:
        from transformers import AutoConfig

        from .backbone import resolve_model

        return int(getattr(AutoConfig.from_pretrained(str(resolve_model(src.model))), "vocab_size", 1000))
    return 1000  # ids below the smallest vocabulary of a BERT-like model


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{_cpu_name()} ({os.cpu_count()} logical cores)"


def summarize(results: list[dict]) -> list[dict]:
    """Per shape: ONNX Runtime / PyTorch eager, merged / base and unmerged PEFT / merged, as ratios of p50."""
    out = []
    shapes = dict.fromkeys((r["batch"], r["seq"]) for r in results)
    for b, s in shapes:
        p50 = {r["backend"]: r["p50_ms"] for r in results if (r["batch"], r["seq"]) == (b, s)}
        row = {"batch": b, "seq": s}
        for key, num, den in (
            ("ort_over_torch", "onnxruntime", "torch-merged"),
            ("merged_over_base", "torch-merged", "torch-base"),
            ("peft_over_merged", "peft-unmerged", "torch-merged"),
        ):
            if num in p50 and den in p50:
                row[key] = p50[num] / p50[den]
        out.append(row)
    return out


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def print_bench(result: dict, console=None) -> None:
    if result.get("kind") == "causal-lm":
        from .decoder_bench import print_decoder_bench

        return print_decoder_bench(result, console)
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"latency on {result['device']}, {result['config']['threads']} threads")
    for col in ("batch", "seq", "backend", "p50 ms", "p90 ms", "p99 ms", "samples/s"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    prev = None
    for r in result["results"]:
        shape = (r["batch"], r["seq"])
        t.add_row(
            *(map(str, shape) if shape != prev else ("", "")),
            r["backend"],
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput']:.1f}",
            end_section=False,
        )
        prev = shape
    console.print(t)
    for s in result["summary"]:
        parts = []
        if "ort_over_torch" in s:
            parts.append(f"ORT/PyTorch p50 {s['ort_over_torch']:.2f}")
        if "merged_over_base" in s:
            parts.append(f"merged/base {s['merged_over_base']:.3f}")
        if "peft_over_merged" in s:
            parts.append(f"unmerged PEFT/merged {s['peft_over_merged']:.2f}")
        if parts:
            shape = f"batch {s['batch']}" + (f" seq {s['seq']}" if s["seq"] else "")
            console.print(f"{shape}: " + ", ".join(parts), soft_wrap=True)
    for n in result["notes"]:
        console.print(f"note: {n}", soft_wrap=True)
