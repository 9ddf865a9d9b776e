"""pmserve export against Hugging Face Optimum (issues 16, 18): export and ONNX Runtime inference, one merged model.

    bash benchmarks/optimum_env.sh                         # .venv-optimum: optimum-onnx, its transformers, torch
    python benchmarks/optimum_bench.py [--runs 12] [--block 10] [--threads 2] [--work /tmp/pmserve-optimum-bench]

What a user would do instead of `pmserve export`: Optimum's ONNX exporter (`optimum-cli export onnx`) and its
ORTModel classes, in Optimum's own virtual environment (optimum-onnx pins an older transformers than pmserve's).
Everything below runs in one invocation, on one merged model:

1. Inputs. Three seeded random PEFT LoRA adapters on all-MiniLM-L6-v2 (builtin:minilm), merged by
   `pmserve merge --method avg --format full --base MINILM --calibrate builtin:wordnet-nouns` (the calibration
   gives the merged folder a prototype classifier over 20 labels, so pmserve can export it as it is). From its
   weights: (a) `classifier/`, a plain BertForSequenceClassification folder (the merged encoder, a seeded random
   head over the same 20 labels); (b) `embedder/`, the merged encoder as a sentence-transformers folder (MiniLM's
   modules.json and mean pooling; the Normalize step MiniLM names).
2. Exports, each a timed subprocess: Optimum fp32 (`optimum-cli export onnx --task text-classification |
   feature-extraction`, its validation on, as by default), Optimum fp32 with `--optimize O2` (ORT's transformer
   fusions, which Optimum offers but does not apply by default), Optimum int8 (ORTQuantizer, dynamic, the
   `AutoQuantizationConfig.avx512_vnni|avx512|avx2(is_static=False, per_channel=False)` its docs show, by CPU);
   pmserve fp32 and `--quantize int8` (`python -m pmserve export FOLDER --out BUNDLE`), and each again with
   `--no-optimize` (no offline transformer fusion: the graph ORT then sees is, like Optimum's default, the
   exporter's, fused by ORT itself at load time), to tell the graph's share of a difference from the rest.
   Export seconds and model.onnx bytes.
3. Latency, texts -> output, the way each is used: Optimum = its tokenizer + ORTModelForSequenceClassification /
   ORTModelForFeatureExtraction forward (+ mean pooling and L2 normalisation in numpy, as MiniLM's model card
   does it) in a worker process in Optimum's venv; pmserve = the bundle's tokenizer (pmserve.backbone.Preprocessor)
   + an ONNX Runtime session on the bundle's model.onnx (what pmserve.predict.OrtModel runs), in this process;
   PyTorch eager (transformers, fp32) at batch 8 for reference. Texts tokenize to exactly SEQ tokens; batch
   1, 8, 32. Every backend uses the same number of intra-op threads. Timing is in blocks: each round runs every
   backend, in a fresh random order, for --warmup untimed calls and then --block timed ones (the Optimum ones
   through the worker, which waits while this process runs), so each is timed as a user calling it over and
   over, and load from elsewhere on the machine hits all alike. p50 / p99 over all timed calls.
4. Outputs against PyTorch eager on texts of mixed length (padding included): max |diff|, top-1 agreement
   (classifier), min cosine (embedding); and what each exporter itself checked.

pmserve's export of a plain HF folder (classifier or encoder) is what is compared; where this pmserve cannot
export such a folder, its rows come from the bundle of the merged pmserve folder (the same encoder weights, its
prototype classifier: mean pooling + 20 cosine rows instead of BERT's pooler + linear head), and the JSON and
the table say so.

Writes benchmarks/results/optimum_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, clean_env, run, write_json

LABEL_SEED = 0
MIXED_TEXTS = [
    "a",
    "the quick brown fox jumps over the lazy dog",
    "An old map of the river, the hills and the small town beside the lake.",
    "time flies",
    "pmserve exports merged models to ONNX Runtime; parity is checked against PyTorch on every export.",
    "Which of these nouns names an animal, which a plant, and which an artifact made by people?",
    "bank",
    "She kept the letters in a wooden box under the stairs for thirty years.",
]


# ================================================================ the worker (runs in Optimum's venv)


def worker(threads: int) -> None:
    """Serve the driver over stdin / a private stdout: load Optimum models, time calls, return outputs.

    Only the protocol goes to the real stdout; anything the libraries print goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    models: dict[str, tuple] = {}
    texts: list[str] = []

    def load(name: str, path: str, kind: str, file_name: str) -> dict:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        cls = ORTModelForSequenceClassification if kind == "classifier" else ORTModelForFeatureExtraction
        model = cls.from_pretrained(
            path, file_name=file_name, provider="CPUExecutionProvider", session_options=so
        )
        tok = AutoTokenizer.from_pretrained(path)
        models[name] = (kind, tok, model)
        return {"providers": model.model.get_providers(), "io_binding": bool(model.use_io_binding)}

    def call(name: str, xs: list[str]) -> np.ndarray:
        kind, tok, model = models[name]
        enc = tok(xs, padding=True, truncation=True, return_tensors="np")
        if kind == "classifier":
            return model(**enc).logits
        h = model(**enc).last_hidden_state  # mean pooling over real tokens, then L2 (MiniLM's model card)
        m = enc["attention_mask"][..., None].astype(h.dtype)
        e = (h * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        return e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "load":
            out = load(req["name"], req["path"], req["kind"], req["file_name"])
        elif op == "texts":
            texts = req["texts"]
            out = {
                "shape": list(
                    models[req["check"]][1](texts, padding=True, return_tensors="np")["input_ids"].shape
                )
            }
        elif op == "time":  # a block: `warm` calls untimed, then `n` timed
            for _ in range(req["warm"]):
                call(req["name"], texts)
            s = []
            for _ in range(req["n"]):
                t0 = time.perf_counter()
                call(req["name"], texts)
                s.append(time.perf_counter() - t0)
            out = {"s": s}
        elif op == "outputs":
            out = {"y": call(req["name"], req["texts"]).astype(np.float64).tolist()}
        elif op == "versions":
            import importlib.metadata as md

            out = {
                p: md.version(p) for p in ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime")
            }
        elif op == "quit":
            break
        else:
            out = {"error": f"unknown op {op}"}
        proto.write(json.dumps(out) + "\n")


class Worker:
    """The driver's end of the worker: one request, one answer."""

    def __init__(self, python: Path, threads: int):
        env = clean_env(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.p = subprocess.Popen(  # by file path: only benchmarks/ goes first on the worker's sys.path
            [str(python), str(Path(__file__).resolve()), "--worker", "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the Optimum worker died (exit {self.p.wait()}); its stderr is above")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.p.wait(timeout=30)


# ================================================================ building the inputs (pmserve's venv)


def random_adapters(base: Path, out: Path, n: int = 3, rank: int = 8) -> list[Path]:
    """n PEFT LoRA adapters on every linear layer of the blocks, seeded random A and B (B ~ N(0, 0.02^2))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    paths = []
    for i in range(n):
        path = out / f"adapter{i}"
        paths.append(path)
        if (path / "adapter_config.json").exists():
            continue
        torch.manual_seed(100 + i)
        model = AutoModel.from_pretrained(str(base), add_pooling_layer=False)  # pmserve adapts the blocks
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["query", "key", "value", "dense"],
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_model.save_pretrained(str(path))
    return paths


def build_inputs(work: Path, base: Path, log) -> dict:
    """adapters -> `pmserve merge` (merged/) -> classifier/ (BertForSequenceClassification) and embedder/."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertForSequenceClassification

    py = str(ROOT / ".venv" / "bin" / "python")
    adapters = random_adapters(base, work / "adapters")
    merged = work / "merged"
    if not (merged / "merge_report.json").exists():
        shutil.rmtree(merged, ignore_errors=True)
        cmd = [py, "-m", "pmserve", "merge", *map(str, adapters), "--method", "avg", "--format", "full"]
        cmd += ["--base", str(base), "--calibrate", "builtin:wordnet-nouns", "--calibrate-head", "prototype"]
        cmd += ["--out", str(merged)]
        log("merging: " + " ".join(cmd[1:]))
        run(cmd, work / "merge.log")
    labels = json.loads((merged / "labels.json").read_text())

    cls_dir = work / "classifier"
    if not (cls_dir / "config.json").exists():
        torch.manual_seed(LABEL_SEED)  # the head BertForSequenceClassification draws for the missing weights
        m = BertForSequenceClassification.from_pretrained(
            str(merged),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={y: i for i, y in enumerate(labels)},
        )
        m.save_pretrained(str(cls_dir))
        AutoTokenizer.from_pretrained(str(merged)).save_pretrained(str(cls_dir))
    emb_dir = work / "embedder"
    if not (emb_dir / "config.json").exists():
        AutoModel.from_pretrained(str(merged), add_pooling_layer=False).save_pretrained(str(emb_dir))
        AutoTokenizer.from_pretrained(str(merged)).save_pretrained(str(emb_dir))
        for f in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
            if (base / f).is_file():
                shutil.copy2(base / f, emb_dir / f)
        shutil.copytree(base / "1_Pooling", emb_dir / "1_Pooling", dirs_exist_ok=True)
        (emb_dir / "2_Normalize").mkdir(exist_ok=True)  # named by MiniLM's modules.json; holds no files
    return {
        "adapters": [str(a) for a in adapters],
        "merged": merged,
        "classifier": cls_dir,
        "embedder": emb_dir,
        "labels": labels,
    }


# ================================================================ exports


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def quant_config_name() -> str:
    flags = cpu_flags()
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


QUANTIZE = """
import sys
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
src, dst, cfg = sys.argv[1:4]
q = ORTQuantizer.from_pretrained(src)
q.quantize(save_dir=dst, quantization_config=getattr(AutoQuantizationConfig, cfg)(is_static=False, per_channel=False))
"""


def onnx_bytes(folder: Path, file_name: str) -> int:
    """model.onnx and its external data, if any."""
    total = (folder / file_name).stat().st_size
    data = folder / (file_name + "_data")
    return total + (data.stat().st_size if data.exists() else 0)


def validation_lines(out: str) -> list[str]:
    keys = (
        "Validating",
        "values close",
        "values not close",
        "max diff",
        "matches",
        "doesn't match",
        "succeeded with the warning",
        "output names match",
    )
    return [ln.strip() for ln in out.splitlines() if any(k in ln for k in keys)]


def export_optimum(opt_venv: Path, folder: Path, task: str, out: Path, logs: Path, extra=()) -> dict:
    cli = opt_venv / "bin" / "optimum-cli"
    cmd = [str(cli), "export", "onnx", "--model", str(folder), "--task", task, *extra, str(out)]
    shutil.rmtree(out, ignore_errors=True)
    # info: Optimum logs its validation's checks at that level (pmserve sets TRANSFORMERS_VERBOSITY=error here)
    dt, text = run(cmd, logs / f"{out.name}.log", {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "info"})
    return {
        "command": " ".join(["optimum-cli", *cmd[1:]]),
        "seconds": dt,
        "file": "model.onnx",
        "onnx_bytes": onnx_bytes(out, "model.onnx"),
        "validation": validation_lines(text),
        "path": str(out),
    }


def quantize_optimum(opt_venv: Path, src: Path, out: Path, logs: Path) -> dict:
    cfg = quant_config_name()
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(opt_venv / "bin" / "python"), "-c", QUANTIZE, str(src), str(out), cfg]
    dt, _ = run(cmd, logs / f"{out.name}.log", {"HF_HUB_OFFLINE": "1"})
    for f in src.iterdir():  # the tokenizer and config, for ORTModel.from_pretrained(out)
        if f.is_file() and not f.name.endswith(".onnx") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return {
        "command": f"ORTQuantizer.from_pretrained(fp32).quantize(AutoQuantizationConfig.{cfg}"
        "(is_static=False, per_channel=False))",
        "seconds": dt,
        "file": "model_quantized.onnx",
        "onnx_bytes": onnx_bytes(out, "model_quantized.onnx"),
        "validation": [],
        "path": str(out),
    }


PM_VARIANTS = {  # name -> extra `pmserve export` options
    "pmserve-fp32": [],
    "pmserve-int8": ["--quantize", "int8"],
    "pmserve-fp32-noopt": ["--no-optimize"],
    "pmserve-int8-noopt": ["--no-optimize", "--quantize", "int8"],
}


def export_pmserve(folder: Path, out: Path, logs: Path, flags: list[str]) -> dict:
    py = str(ROOT / ".venv" / "bin" / "python")
    cmd = [py, "-m", "pmserve", "export", str(folder), "--out", str(out), *flags]
    shutil.rmtree(out, ignore_errors=True)
    dt, text = run(cmd, logs / f"{out.name}.log")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "command": "python -m pmserve export " + " ".join(cmd[4:]),
        "seconds": dt,
        "file": "model.onnx",
        "onnx_bytes": onnx_bytes(out, "model.onnx"),
        "path": str(out),
        "validation": [ln for ln in text.splitlines() if "parity" in ln or "int8" in ln],
        "parity": manifest.get("parity"),
        "optimization": manifest.get("optimization"),
        "quantization": manifest.get("quantization"),
        "outputs": manifest.get("outputs"),
        "source": manifest.get("source"),
    }


def try_export_pmserve(
    preferred: Path, fallback: Path | None, out: Path, logs: Path, flags: list[str], log
) -> dict:
    """pmserve's export of the plain HF folder; where this pmserve refuses it (or writes a bundle that its own
    checks refuse), the merged pmserve folder."""
    from pmserve.errors import PMError

    try:
        r = export_pmserve(preferred, out, logs, flags)
        PmBundle(out, 1)
        return r | {"input": str(preferred), "fallback": False}
    except (subprocess.CalledProcessError, PMError) as e:
        text = e.output if isinstance(e, subprocess.CalledProcessError) else str(e)
        why = (text or "").strip().splitlines()[-1:] or ["(no output)"]
        if fallback is None:
            log(f"pmserve export {preferred.name}: failed ({why[0]}); no fallback")
            return {"input": str(preferred), "failed": why[0]}
        log(f"pmserve export {preferred.name}: failed ({why[0]}); exporting {fallback} instead")
        r = export_pmserve(fallback, out, logs, flags)
        return r | {"input": str(fallback), "fallback": True, "preferred_failed": why[0]}


# ================================================================ inference backends in this process


class PmBundle:
    """The bundle's tokenizer and an ONNX Runtime session on its model.onnx: what pmserve.predict runs."""

    def __init__(self, bundle: Path, threads: int):
        from pmserve import defaults as D
        from pmserve.backbone import Preprocessor
        from pmserve.formats.bundle import verify_bundle
        from pmserve.predict import ort_session

        m = verify_bundle(bundle)
        self.prep = Preprocessor(bundle, m["input_kind"], int(m.get("max_length", D.UNKNOWN_MAX_LENGTH)))
        self.sess = ort_session(bundle / "model.onnx", "cpu", threads)
        outs = [o.name for o in self.sess.get_outputs()]
        self.output = next((n for n in ("scores", "embedding") if n in outs), outs[0])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = outs

    def __call__(self, xs: list[str]) -> np.ndarray:
        b = self.prep(xs)
        return self.sess.run([self.output], {n: b[n].numpy() for n in self.inputs})[0]


class TorchEager:
    """transformers in PyTorch eager, fp32: the classifier's logits, or MiniLM's normalised mean pooling."""

    def __init__(self, folder: Path, kind: str):
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self.torch, self.kind = torch, kind
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        cls = AutoModelForSequenceClassification if kind == "classifier" else AutoModel
        self.model = cls.from_pretrained(str(folder)).eval()

    def __call__(self, xs: list[str]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            enc = self.tok(xs, padding=True, truncation=True, return_tensors="pt")
            out = self.model(**enc)
            if self.kind == "classifier":
                return out.logits.numpy()
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(e, dim=1).numpy()


def fixed_length_texts(tok, n: int, seq: int, seed: int) -> list[str]:
    """n texts of whole-word vocabulary entries that tokenize to exactly seq tokens with [CLS] and [SEP]."""
    rng = np.random.default_rng(seed)
    words = [w for w in tok.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    words.sort()
    texts = []
    while len(texts) < n:
        t = " ".join(rng.choice(words, seq - 2))
        if len(tok(t)["input_ids"]) == seq:
            texts.append(t)
    return texts


# ================================================================ timing


def time_shape(
    backends: dict, worker: Worker, texts: list[str], warmup: int, runs: int, block: int, rng
) -> dict:
    """Seconds per call, per backend: each round runs every backend, in a fresh random order, for a block of
    `warmup` untimed calls then `block` timed ones.

    Blocks, not single calls: a backend's intra-op threads (ONNX Runtime's pool, PyTorch's OpenMP team) spin
    for a while after each call, so a call timed right after another backend's competes with that backend's
    spinning threads for the cores. Alternating call by call charged every backend with its predecessor's
    spin (on 2 cores, PyTorch eager at batch 8 took 1.5x its time in a loop of its own). A user calls one
    tool over and over; each block measures that, and the rounds still spread outside load over all alike."""
    local = {k: f for k, f in backends.items() if not k.startswith("optimum")}
    names = list(backends)

    def run_block(name: str) -> list[float]:
        if name not in local:
            return worker.ask(op="time", name=backends[name], warm=warmup, n=block)["s"]
        for _ in range(warmup):
            local[name](texts)
        out = []
        for _ in range(block):
            t0 = time.perf_counter()
            local[name](texts)
            out.append(time.perf_counter() - t0)
        return out

    times = {n: [] for n in names}
    for _ in range(runs):
        for j in rng.permutation(len(names)):
            times[names[j]] += run_block(names[j])
    return times


def stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "n": len(ms),
    }


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def compare(ref: np.ndarray, got: np.ndarray, kind: str) -> dict:
    """Against PyTorch eager. Classifiers on one scale, probabilities (a bundle's scores may already be
    probabilities, Optimum's logits are not); embeddings as they are (L2-normalised on both sides)."""
    if ref.shape != got.shape:
        return {"note": f"shapes differ: PyTorch {list(ref.shape)}, this {list(got.shape)}"}
    if kind == "classifier":
        is_probs = got.min() >= 0 and np.allclose(got.sum(1), 1, atol=1e-3)
        r, g = softmax(ref), (got if is_probs else softmax(got))
        return {
            "output": "probabilities" if is_probs else "logits",
            "top1_agreement": float((r.argmax(1) == g.argmax(1)).mean()),
            "max_abs_diff_probs": float(np.abs(r - g).max()),
        }
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ref - got).max())}


# ================================================================ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pmserve-optimum-bench"))
    ap.add_argument("--optimum-venv", type=Path, default=ROOT / ".venv-optimum")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every backend")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls at the start of every block")
    ap.add_argument("--runs", type=int, default=12, help="rounds per shape: every backend one block each")
    ap.add_argument("--block", type=int, default=10, help="timed calls per backend per round")
    ap.add_argument("--torch-batch", type=int, default=8, help="the batch PyTorch eager is timed at")
    ap.add_argument("--models", default="classifier,embedder")
    ap.add_argument("--reexport", action="store_true", help="export again even where the work folder has one")
    ap.add_argument("--json", type=Path, default=RESULTS / "optimum_bench.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.threads)
        return

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from pmserve.backbone import resolve_model

    torch.set_num_threads(args.threads)
    if not (args.optimum_venv / "bin" / "optimum-cli").exists():
        sys.exit(f"{args.optimum_venv}: no Optimum environment; run `bash benchmarks/optimum_env.sh` first")
    work = args.work
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    base = resolve_model("builtin:minilm")
    inputs = build_inputs(work, base, log)
    batches = [int(b) for b in args.batches.split(",")]
    kinds = args.models.split(",")
    task = {"classifier": "text-classification", "embedder": "feature-extraction"}

    # ---- exports
    exports: dict[str, dict[str, dict]] = {}
    ex_json = work / "exports.json"
    if ex_json.exists() and not args.reexport:
        exports = json.loads(ex_json.read_text())
    for kind in kinds:
        if kind in exports:
            continue
        folder = inputs[kind]
        lib = ["--library", "transformers"] if kind == "embedder" else []
        e: dict[str, dict] = {}
        log(f"[{kind}] optimum-cli export onnx (fp32, then --optimize O2), ORTQuantizer int8")
        e["optimum-fp32"] = export_optimum(
            args.optimum_venv, folder, task[kind], work / f"opt-{kind}-fp32", logs, lib
        )
        e["optimum-O2"] = export_optimum(
            args.optimum_venv, folder, task[kind], work / f"opt-{kind}-o2", logs, [*lib, "--optimize", "O2"]
        )
        e["optimum-int8"] = quantize_optimum(
            args.optimum_venv, work / f"opt-{kind}-fp32", work / f"opt-{kind}-int8", logs
        )
        fb = inputs["merged"]
        log(f"[{kind}] pmserve export (fp32, int8; each also with --no-optimize)")
        for name, flags in PM_VARIANTS.items():
            out = work / f"pm-{kind}-{name.removeprefix('pmserve-')}"
            e[name] = try_export_pmserve(folder, fb, out, logs, flags, log)
        exports[kind] = e
        write_json(ex_json, exports, default=str)
    for kind in kinds:
        for name, r in exports[kind].items():
            if "seconds" in r:
                log(f"[{kind}] {name}: {r['seconds']:.1f} s, {r['onnx_bytes'] / 2**20:.1f} MiB")

    # ---- latency and outputs
    wk = Worker(args.optimum_venv / "bin" / "python", args.threads)
    results, quality, backends_info = [], {}, {}
    rng = np.random.default_rng(1)
    try:
        versions_optimum = wk.ask(op="versions")
        for kind in kinds:
            e = exports[kind]
            backends: dict = {}
            for name in PM_VARIANTS:
                if "path" in e[name]:
                    backends[name] = PmBundle(Path(e[name]["path"]), args.threads)
            for name in ("optimum-fp32", "optimum-O2", "optimum-int8"):
                key = f"{kind}:{name}"
                info = wk.ask(op="load", name=key, path=e[name]["path"], kind=kind, file_name=e[name]["file"])
                backends[name] = key
                backends_info[key] = info
            eager = TorchEager(inputs[kind], kind)
            # outputs against PyTorch eager
            ref = eager(MIXED_TEXTS)
            q = {}
            for name, b in backends.items():
                if e[name].get(
                    "fallback"
                ):  # another model (pmserve's own head): its export's parity stands in
                    q[name] = {
                        "note": "fallback bundle: its export's parity against its own PyTorch model",
                        "parity": e[name].get("parity"),
                    }
                    continue
                got = (
                    np.array(wk.ask(op="outputs", name=b, texts=MIXED_TEXTS)["y"])
                    if isinstance(b, str)
                    else b(MIXED_TEXTS)
                )
                q[name] = compare(ref, np.asarray(got, dtype=np.float64), kind)
            quality[kind] = q
            tok = eager.tok
            for b in batches:
                texts = fixed_length_texts(tok, b, args.seq, seed=b)
                shape = wk.ask(op="texts", texts=texts, check=backends["optimum-fp32"])["shape"]
                assert shape == [b, args.seq], shape
                here = dict(backends)
                if b == args.torch_batch:
                    here["torch-eager"] = eager
                log(
                    f"[{kind}] batch {b} seq {args.seq}: {len(here)} backends x {args.runs} rounds x {args.block} calls, load {os.getloadavg()[0]:.2f}"
                )
                times = time_shape(here, wk, texts, args.warmup, args.runs, args.block, rng)
                for name, s in times.items():
                    results.append({"model": kind, "backend": name, "batch": b, "seq": args.seq, **stats(s)})
                log("   " + ", ".join(f"{r['backend']} {r['p50_ms']:.1f}" for r in results[-len(times) :]))
    finally:
        wk.close()
    load_after = os.getloadavg()

    summary = summarize(results, kinds, batches, args.torch_batch)
    import onnxruntime
    import transformers

    from pmserve.bench import _cpu_name

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "pmserve_tree": _git_state(),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": load_before,
            "load_after": load_after,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "versions": {
            "pmserve_env": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "optimum_env": versions_optimum,
        },
        "inputs": {k: str(v) for k, v in inputs.items() if k != "labels"}
        | {"classes": len(inputs["labels"])},
        "exports": exports,
        "optimum_sessions": backends_info,
        "outputs_vs_pytorch": quality,
        "latency": results,
        "summary": summary,
    }
    write_json(args.json, result, default=str)
    print_table(result)
    print(f"wrote {args.json}")


def summarize(results: list[dict], kinds, batches, torch_batch) -> list[dict]:
    out = []
    for kind in kinds:
        for b in batches:
            p = {r["backend"]: r["p50_ms"] for r in results if r["model"] == kind and r["batch"] == b}
            row = {"model": kind, "batch": b}
            for num, den in (
                ("pmserve-fp32", "optimum-fp32"),
                ("pmserve-fp32", "optimum-O2"),
                ("pmserve-int8", "optimum-int8"),
                ("pmserve-fp32-noopt", "optimum-fp32"),
                ("pmserve-int8-noopt", "optimum-int8"),
                ("pmserve-fp32", "pmserve-fp32-noopt"),
                ("pmserve-fp32", "torch-eager"),
                ("pmserve-int8", "torch-eager"),
                ("optimum-fp32", "torch-eager"),
            ):
                if num in p and den in p:
                    row[f"{num}/{den}"] = p[num] / p[den]
            out.append(row)
    return out


def print_table(res: dict) -> None:
    rows = res["latency"]
    print(
        f"\nlatency, texts -> output, seq {res['config']['seq']}, {res['config']['threads']} threads "
        f"(p50 / p99 ms over {res['config']['runs']} rounds of {res['config'].get('block', 1)} calls, backends alternated)"
    )
    names = ["pmserve-fp32", "pmserve-fp32-noopt", "optimum-fp32", "optimum-O2"]
    names += ["pmserve-int8", "pmserve-int8-noopt", "optimum-int8", "torch-eager"]
    print(f"{'model':<11}{'batch':>6}" + "".join(f"{n:>20}" for n in names))
    for kind in dict.fromkeys(r["model"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows if r["model"] == kind):
            cells = {r["backend"]: r for r in rows if r["model"] == kind and r["batch"] == b}
            line = f"{kind:<11}{b:>6}"
            for n in names:
                c = cells.get(n)
                cell = f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f}" if c else "-"
                line += f"{cell:>20}"
            print(line)
    print("\nratios of p50")
    for s in res["summary"]:
        print(
            f"{s['model']:<11}{s['batch']:>6}  " + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if "/" in k)
        )
    print("\nexports (seconds, model MiB)")
    for kind, e in res["exports"].items():
        print(
            f"{kind:<11}"
            + ", ".join(
                f"{n} {r['seconds']:.1f} s {r['onnx_bytes'] / 2**20:.1f} MiB"
                for n, r in e.items()
                if "seconds" in r
            )
        )
    print("\noutputs against PyTorch eager (mixed-length texts)")
    for kind, q in res["outputs_vs_pytorch"].items():
        for n, r in q.items():
            print(
                f"{kind:<11}{n:<20}"
                + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
            )


def _git_state() -> dict:
    """The commit measured, and pmserve files that differed from it (other work in the same tree)."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip()

    dirty = git("status", "--porcelain", "--", "pmserve", "cli").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": [ln[3:] for ln in dirty]}


if __name__ == "__main__":
    main()
