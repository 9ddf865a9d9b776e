"""Serving a merged model: one interface over an ONNX Runtime bundle and the PyTorch merged model; predict, eval.

`open_model(PATH)` reads a BUNDLE (verified against its manifest, run by ONNX Runtime with the CUDA execution
provider when a GPU is present, else the CPU one) or a model folder export reads (a RUN, a Hugging Face folder,
a merge output; run by PyTorch). Both turn raw inputs into the model's output with the same preprocessing:
scores over every class (a classifier), or embeddings; so `evaluate` measures classifiers alike and a bundle's
accuracy can be compared with its source's. An embedding model has no labels to evaluate.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import defaults as D
from .backbone import Preprocessor
from .errors import PMError
from .formats import run as run_files
from .formats.bundle import MODEL, is_bundle, require_encoder, verify_bundle
from .formats.merged import MergedSource, inspect_merged
from .merged_model import InferenceModel, load_inference_model, saved_rejection
from .rejection import FIT, SCORES, top_labels

PROVIDERS = ("auto", "cpu", "cuda")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------- ONNX Runtime sessions


def _nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def ort_providers(provider: str = "auto") -> list[str]:
    """Execution providers for `--provider`: auto = CUDA when ONNX Runtime has it and a GPU driver is present."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise PMError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _nvidia_driver()
    if provider == "cuda" and not cuda:
        raise PMError("--provider cuda: no GPU driver or no CUDA execution provider in this ONNX Runtime")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def ort_session(path: Path | str, provider: str = "auto", threads: int = 0, spinning: bool = True):
    """An InferenceSession on `path`; asking for cuda and not getting it is an error, not a silent fallback.

    `spinning`: ONNX Runtime's intra-op threads spin for a while after each run, waiting for the next one; that
    pays in a tight loop of calls (predict, bench), but in a server they spin on the cores the event loop and the
    tokenizer need (on 2 cores, `pmserve serve` with spinning answered about half the requests per second on
    long texts), so serve turns it off."""
    import onnxruntime as ort

    providers = ort_providers(provider)
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN libraries from the nvidia-* wheels, when that is where they are
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 -- the session below says whether CUDA works
            pass
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 -- ORT raises its own pybind error types
        raise PMError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
    if provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise PMError("--provider cuda: ONNX Runtime could not start its CUDA execution provider")
    return sess


# ---------------------------------------------------------------- models behind one interface


class Model:
    """Raw inputs -> the model's rows (numpy, float32): `scores` [n, classes] with the labels of the columns,
    or `embedding` [n, dim] (no labels). A classifier that rejects by fit (pmserve.rejection) has one more
    column, last: each row's fit (`has_fit`); `split` parts a row's scores from it."""

    backend = ""
    reject: float | None = None  # the out-of-scope threshold (pmserve.rejection); None: off
    has_fit = False

    def __init__(
        self,
        prep: Preprocessor,
        labels: list[str],
        input_names: list[str],
        input_kind: str,
        output: str = "scores",
    ):
        self.prep, self.labels = prep, list(labels)
        self.input_names, self.input_kind, self.output = input_names, input_kind, output

    @property
    def kind(self) -> str:
        """classifier or embedding."""
        return "embedding" if self.output == "embedding" else "classifier"

    def run(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        raise NotImplementedError

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores, fit) of the model's rows; fit None where the model has none."""
        return (rows[:, :-1], rows[:, -1]) if self.has_fit else (rows, None)

    def top_labels(self, rows: np.ndarray) -> list[str]:
        """Each row's answer: its top label, or the out-of-scope label where the model rejects it."""
        scores, fit = self.split(rows)
        return top_labels(scores, self.labels, self.reject, fit)

    def encode(self, inputs: list):
        """Inputs tokenized (or pixel values), not padded: one encoding serves several calls (`score_rows`)."""
        return self.prep.encode(inputs)

    def lengths(self, encoded) -> list[int]:
        """Positions each encoded input fills in a batch before padding (see Preprocessor.lengths)."""
        return self.prep.lengths(encoded)

    def scores(self, inputs: list) -> np.ndarray:
        return self.score_rows(self.encode(inputs))

    def score_rows(self, encoded, rows=None) -> np.ndarray:
        """The output for `rows` (default all) of `encoded`, as one model call padded to their longest."""
        batch = self.prep.collate(encoded, rows)
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise PMError(f"the preprocessor does not produce the model input {missing[0]!r}")
        return self.run(batch)


class OrtModel(Model):
    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        prep: Preprocessor,
        labels,
        input_kind: str,
        provider="auto",
        threads=0,
        spinning: bool = True,
    ):
        self.session = ort_session(onnx_path, provider, threads, spinning)
        names = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        super().__init__(prep, labels, names, input_kind, self.outputs[0])
        self.has_fit = FIT in self.outputs[1:]
        self.providers = self.session.get_providers()

    @classmethod
    def from_bundle(
        cls, path: Path | str, provider: str = "auto", threads: int = 0, spinning: bool = True
    ) -> OrtModel:
        path = Path(path)
        m = verify_bundle(path)
        require_encoder(path, m)
        prep = Preprocessor(path, m["input_kind"], int(m.get("max_length", D.UNKNOWN_MAX_LENGTH)))
        model = cls(path / MODEL, prep, m["labels"], m["input_kind"], provider, threads, spinning)
        model.manifest = m
        reject = m.get("reject") or {}
        model.reject = reject.get("threshold")
        if reject.get("score") == SCORES["cosine"] and not model.has_fit:
            raise PMError(f"{path}: its manifest rejects by fit, but {MODEL} has no {FIT!r} output")
        return model

    def run(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return ort_rows(self.session, self.outputs, {n: batch[n].numpy() for n in self.input_names})


def ort_rows(session, outputs: list[str], feed: dict[str, np.ndarray]) -> np.ndarray:
    """A graph's `outputs` as Model's rows: the first, then the fit as one more column where there is one."""
    if FIT not in outputs[1:]:
        return session.run(outputs[:1], feed)[0].astype(np.float32, copy=False)
    scores, fit = session.run([outputs[0], FIT], feed)
    return np.concatenate([scores, fit[:, None]], 1).astype(np.float32, copy=False)


class TorchModel(Model):
    backend = "pytorch"

    def __init__(self, model: InferenceModel, prep: Preprocessor, input_kind: str, device: str = "cpu"):
        super().__init__(prep, model.labels, model.input_names, input_kind, model.output)
        self.has_fit = model.has_fit
        self.device = torch.device(device)
        self.model = model.to(self.device)

    @classmethod
    def from_merged(cls, src: MergedSource | Path | str, provider: str = "auto") -> TorchModel:
        src = src if isinstance(src, MergedSource) else inspect_merged(src)
        model, prep = load_inference_model(src)
        model.source = src
        out = cls(model, prep, src.input_kind, torch_device(provider))
        out.reject = (saved_rejection(src) or {}).get("threshold")
        return out

    @torch.inference_mode()
    def run(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.model.scores({k: v.to(self.device) for k, v in batch.items()}).float().cpu().numpy()


def torch_device(provider: str) -> str:
    if provider not in PROVIDERS:
        raise PMError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cuda" and not torch.cuda.is_available():
        raise PMError("--provider cuda: PyTorch sees no CUDA device")
    return "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"


def open_model(path: Path | str, provider: str = "auto", threads: int = 0) -> Model:
    """A BUNDLE (ONNX Runtime) or a merged model folder (PyTorch), by what the folder holds."""
    path = Path(path)
    if is_bundle(path):
        return OrtModel.from_bundle(path, provider, threads)
    if (path / MODEL).is_file():
        verify_bundle(path)  # an ONNX file without a manifest: say so in the bundle's words
    return TorchModel.from_merged(path, provider)


# ---------------------------------------------------------------- inputs


def read_inputs(args: list[str], kind: str) -> list:
    """INPUT arguments -> model inputs: texts (or image paths), `.txt` files of lines, `.jsonl` files with a
    `text` (or `image`) field, `-` for lines on stdin. An input of the other kind is a PMError naming it."""
    out: list = []
    for a in args:
        p = Path(a)
        if a == "-":
            out += [line.rstrip("\n") for line in sys.stdin if line.strip()]
        elif p.suffix == ".jsonl" and p.is_file():
            out += _jsonl_inputs(p, kind)
        elif p.suffix == ".txt" and p.is_file():
            lines = [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
            out += lines if kind == "text" else [_image_path(str(p.parent / x), f"{p}: ") for x in lines]
        elif kind == "image":
            out.append(_image_path(a, ""))
        elif p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            raise PMError(f"{a}: an image, but the model reads text")
        else:
            out.append(a)
    if not out:
        raise PMError("INPUT: no inputs")
    return out


def _image_path(a: str, where: str) -> str:
    p = Path(a)
    if not p.is_file():
        raise PMError(f"{where}{a}: not an image file (the model reads images)")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise PMError(f"{where}{a}: not an image file ({p.suffix or 'no suffix'}; the model reads images)")
    return str(p)


def _jsonl_inputs(path: Path, kind: str) -> list:
    other = "image" if kind == "text" else "text"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PMError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or kind not in row:
            has_other = isinstance(row, dict) and other in row
            why = (
                f"has an '{other}' field, but the model reads {kind}"
                if has_other
                else f"has no '{kind}' field"
            )
            raise PMError(f"{path}: line {n} {why}")
        x = row[kind]
        out.append(
            str(x) if kind == "text" else _image_path(str(path.parent / str(x)), f"{path}: line {n}: ")
        )
    return out


# ---------------------------------------------------------------- predict and eval


def _batches(inputs: list, batch_size: int):
    """Index batches, texts sorted by length so a batch pads little; results go back in input order."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]) if isinstance(inputs[i], str) else 0)
    for k in range(0, len(order), batch_size):
        yield order[k : k + batch_size]


def score_all(model: Model, inputs: list, batch_size: int = 64) -> np.ndarray:
    """The model's rows for every input, in input order: [n, classes] scores (and the fit: Model.split) or
    [n, dim] embeddings."""
    out = None
    for idx in _batches(inputs, batch_size):
        rows = model.scores([inputs[i] for i in idx])
        if out is None:
            out = np.zeros((len(inputs), rows.shape[1]), dtype=np.float32)
        out[idx] = rows
    return out


def predict(
    path: Path | str,
    inputs: list[str],
    provider: str = D.PREDICT_PROVIDER,
    top_k: int = D.PREDICT_TOP_K,
    batch_size: int = D.PREDICT_BATCH_SIZE,
) -> tuple[list[dict], Model]:
    """For each input: its answer (its top label, or OUT_OF_SCOPE where the model rejects it), the top score
    (and the next top_k - 1 labels and scores) and, for a model that rejects by fit, its fit; or its embedding
    (an embedding model). The model is returned for its facts."""
    if top_k < 1:
        raise PMError(f"--top-k: must be at least 1, got {top_k}")
    if batch_size < 1:
        raise PMError(f"--batch-size: must be at least 1, got {batch_size}")
    model = open_model(path, provider)
    xs = read_inputs(inputs, model.input_kind)
    out = score_all(model, xs, batch_size)
    if model.kind == "embedding":
        return [{"input": x, "embedding": e.tolist()} for x, e in zip(xs, out)], model
    rows, (scores, fit) = [], model.split(out)
    for k, (x, s, label) in enumerate(zip(xs, scores, model.top_labels(out))):
        top = np.argsort(-s, kind="stable")[:top_k]
        rows.append(
            {
                "input": x,
                "label": label,
                "score": float(s[top[0]]),
                "top": [(model.labels[i], float(s[i])) for i in top],
            }
            | ({} if fit is None else {"fit": float(fit[k])})
        )
    return rows, model


def source_of(model: Model) -> dict:
    """Where the model came from: the bundle manifest's source, or the merged folder's facts."""
    if isinstance(model, OrtModel):
        return model.manifest.get("source", {})
    return model.model.source.describe()


def evaluate(
    path: Path | str,
    data: str | None = None,
    seed: int | None = None,
    provider: str = D.PREDICT_PROVIDER,
    batch_size: int = D.PREDICT_BATCH_SIZE,
) -> dict:
    """Accuracy on the test split of every task of DATA (default: the task sequence the model was trained on);
    for a model that rejects, also with rejection (`acc_with_rejection`)."""
    from .tasks import load_tasks

    if batch_size < 1:
        raise PMError(f"--batch-size: must be at least 1, got {batch_size}")
    model = open_model(path, provider)
    if model.kind == "embedding":
        raise PMError(f"{path}: an embedding model (no labels): nothing to evaluate")
    src = source_of(model)
    seed = src.get("seed", 0) if seed is None else seed
    run = Path(src["path"]) if src.get("kind") == "run" and src.get("path") else None
    if not data and run is not None and run_files.is_run(run) and run_files.read_plan(run):
        from .train import run_tests

        tests = run_tests(run)  # the RUN's own record of its test sets: kept copies, else their sources
        # a version exported earlier saw only the RUN's first tasks: it is measured on those
        seen = src.get("tasks")
        if seen is not None:
            if [t.name for t in tests[: len(seen)]] != list(seen):
                raise PMError(
                    f"{path}: was exported from the tasks {', '.join(seen)} of {run}, which no longer begins "
                    "with them; give DATA"
                )
            tests = tests[: len(seen)]
        tasks = [t for t in tests if t.test is not None]
        res = evaluate_model(model, tasks, batch_size) if tasks else {"backend": model.backend, "tasks": []}
        rows = {r["task"]: r for r in res["tasks"]}
        res["tasks"] = [rows.get(t.name, {"task": t.name, "n": 0, "acc": None}) for t in tests]
        if not tasks:
            res.update(mean=None, overall=None)
        return res | {"model": str(path), "data": str(run), "seed": seed}
    data = data or src.get("data")
    if not data:
        raise PMError(f"DATA: not given, and {path} does not record the task sequence it was trained on")
    tasks = load_tasks(data, seed)
    return evaluate_model(model, tasks, batch_size) | {"model": str(path), "data": data, "seed": seed}


def evaluate_model(model: Model, tasks: list, batch_size: int = D.PREDICT_BATCH_SIZE) -> dict:
    known = set(model.labels)
    rows, hits, total = [], 0, 0
    for t in tasks:
        if t.kind != model.input_kind:
            raise PMError(f"task {t.name}: {t.kind} inputs, but the model reads {model.input_kind}")
        unknown = sorted(set(t.test.labels) - known)
        if unknown:
            raise PMError(
                f"task {t.name}: label {unknown[0]!r} is not one of the model's {len(known)} classes"
            )
        out = score_all(model, t.test.inputs, batch_size)
        pred = model.split(out)[0].argmax(1)
        ok = sum(model.labels[p] == y for p, y in zip(pred.tolist(), t.test.labels))
        rows.append({"task": t.name, "n": len(t.test.labels), "acc": ok / len(t.test.labels)})
        if model.reject is not None:  # a rejected request is a wrong answer: what rejection costs in scope
            kept = sum(a == y for a, y in zip(model.top_labels(out), t.test.labels))
            rows[-1]["acc_with_rejection"] = kept / len(t.test.labels)
        hits, total = hits + ok, total + len(t.test.labels)
    res = {
        "backend": model.backend,
        "tasks": rows,
        "mean": sum(r["acc"] for r in rows) / len(rows),  # ACC as metrics.json reports it
        "overall": hits / total,  # pooled over every test example
    }
    if model.reject is not None:
        res["mean_with_rejection"] = sum(r["acc_with_rejection"] for r in rows) / len(rows)
    return res
