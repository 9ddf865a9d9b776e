"""A merged model on disk: a RUN, or a `pmserve merge` output folder, read and checked without loading weights.

What `pmserve merge` writes (any --format): merge_report.json (method, alphas, inputs with sha256, per-module
norms, notes), README.md (the model card), the classifier (classifier.*, head.*, labels.json) and
- delta: merged.safetensors, W_hat - W_0 per adapted module, and modules_to_save.safetensors when the adapters
  saved PEFT modules_to_save (a SEQ_CLS head): the merged tensors whole, by the base model's parameter names;
- adapter: one PEFT LoRA (formats.peft), the merged modules_to_save in it as PEFT saves them;
- full: a Hugging Face model folder with W_hat baked in, its tokenizer or image processor, and
  pmserve_merge.json (method, alphas, tasks, data, max_length, base model).

Two kinds of folder hold a model export can load: a RUN (its state, a run.snapshot, has merged.safetensors on top
of the base model named in config.json, absent for `--method frozen`, and the classifier) and a full folder.

Export takes models made elsewhere too, so a MergedSource also describes: any Hugging Face model folder (kind
"full"; a *ForSequenceClassification / *ForImageClassification keeps its own head, labels from id2label; a bare
encoder or sentence-transformers folder becomes an embedding model, pooled as formats.pooling reads it), and a
`pmserve merge --format delta|adapter` output on top of its base (kinds "delta" and "adapter"; W_0 + D is
applied when the model loads, and merged or single-adapter PEFT modules_to_save replace the base's tensors, so a
SEQ_CLS adapter's trained head is the head exported). What the source is decides what the bundle outputs: class
scores (`output` "classifier") or embeddings ("embedding").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import UNKNOWN_MAX_LENGTH
from ..errors import PMError
from . import LABELS, MODEL_CARD, read_json, read_labels, sha256_file
from . import peft as peft_files
from . import pooling as pooling_files
from . import run as run_files

META = "pmserve_merge.json"
REPORT = "merge_report.json"
SAVED = (
    "modules_to_save.safetensors"  # delta: merged PEFT modules_to_save, whole tensors that replace the base's
)
# where a full folder may keep pmserve's own facts (alphas, max_length, base model, data); the first found counts
FULL_METADATA = (META, "pmserve.json", "merge.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
IMAGE_MODEL_TYPES = ("vit", "deit", "dinov2")  # the types backbone.load_encoder reads as image models
# encoders whose graph the TorchScript exporter writes and ONNX Runtime runs (others: a one-line refusal)
TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet")
HEAD_ARCHITECTURES = ("ForSequenceClassification", "ForImageClassification")  # a head export keeps
ENCODER_ARCHITECTURES = ("Model", "ForMaskedLM", "ForPreTraining")  # a bare encoder (an LM head is dropped)
MODEL_HEAD = "model"  # MergedSource.head when the scores are the model's own head's
SCORES = ("logits", "softmax")


def is_companion(name: str) -> bool:
    """Whether a base model's file travels with a full merged model: config, tokenizer, processor; not the
    weights (rewritten), their index, or the base's model card (replaced by the merge's)."""
    return not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json") and name != MODEL_CARD


@dataclass
class MergedSource:
    """What a model folder holds, read and checked without loading any weights."""

    path: Path
    kind: str  # "run", "full" (a Hugging Face model folder), "delta" or "adapter" (on top of base_model)
    model: str  # what load_encoder reads: the RUN's base model, the full folder itself, or the delta's base
    input_kind: str  # "text" or "image"
    max_length: int
    labels: list[str]  # the classes, in score order; empty for an embedding model
    head: str | None  # pmserve's classifier kind (linear, cosine, prototype, ridge), MODEL_HEAD, or None
    classifier_dir: Path | None  # where pmserve's classifier.* are; None when the scores are not pmserve's
    merged_file: Path | None = None  # RUN or delta: W_hat - W_0; None for a frozen run or a full folder
    method: str | None = None
    alphas: list = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data: str | None = None  # the task sequence whose test sets measure it, when known
    seed: int = 0
    base_model: str | None = None  # the pretrained W_0, when known (RUN: its model; full: from metadata)
    adapter_dirs: list[Path] = field(default_factory=list)  # RUN: every task's PEFT adapter, in order
    output: str = "classifier"  # or "embedding"
    pooling: str | None = None  # mean | cls | max: the graph's pooling; None: the model's own head pools
    normalize: bool = False  # L2-normalised embeddings
    pooling_from: str | None = None  # the file the pooling was read from, "default", or "--pooling"
    scores: str | None = None  # the model's own head: its logits, or their softmax
    merged_adapter: Path | None = None  # kind "adapter": the PEFT LoRA whose delta is applied to `model`
    # kind "delta": the merged PEFT modules_to_save, whole tensors that replace the base's (an adapter holds its own)
    saved_file: Path | None = None
    architecture: str | None = None  # config.json's architectures[0]

    def describe(self) -> dict:
        """The facts a bundle's manifest records about where it came from."""
        model = self.model
        if self.kind != "run" and not model.startswith("builtin:"):
            model = str(Path(model).resolve())
        return {
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "model": model,
            "base_model": self.base_model,
            "architecture": self.architecture,
            "method": self.method,
            "head": self.head,
            "tasks": self.tasks,
            "data": self.data,
            "seed": self.seed,
            "max_length": self.max_length,
        }

    def summary(self) -> str:
        """A few words for the terminal: what kind of model, what it outputs."""
        if self.output == "embedding":
            norm = ", normalised" if self.normalize else ""
            return f"{self.kind}, embedding model, {self.pooling} pooling{norm}"
        what = f"its own head, {self.scores}" if self.head == MODEL_HEAD else f"{self.head} classifier"
        return f"{self.kind}, {len(self.labels)} classes, {what}"

    def configure(
        self, scores: str | None = None, pooling: str | None = None, normalize: bool | None = None
    ) -> list[str]:
        """Apply export's --scores / --pooling / --normalize where they mean something for this model, refuse
        them where they do not; returns notes for the terminal (an option that overrides the model's files)."""
        notes = []
        if scores is not None:
            if scores not in SCORES:
                raise PMError(f"--scores: must be one of {', '.join(SCORES)}, got {scores!r}")
            if self.head != MODEL_HEAD:
                what = (
                    "an embedding model"
                    if self.output == "embedding"
                    else f"pmserve's {self.head} classifier"
                )
                raise PMError(
                    f"--scores: {self.path} is {what}; --scores applies to a model with its own classification head"
                )
            if scores == "softmax" and self.scores != "softmax":
                raise PMError(
                    f"--scores softmax: {self.architecture}'s config.json says problem_type is not single-label "
                    "classification (its scores stay logits)"
                )
            self.scores = scores
        if pooling is not None or normalize is not None:
            opt = "--pooling" if pooling is not None else "--normalize/--no-normalize"
            if self.output != "embedding":
                raise PMError(
                    f"{opt}: {self.path} is a classifier ({self.summary()}); pooling applies to embedding models"
                )
            from_files = self.pooling_from not in (None, "default", "--pooling")
            if pooling is not None:
                if pooling not in pooling_files.POOLINGS:
                    raise PMError(
                        f"--pooling: must be one of {', '.join(pooling_files.POOLINGS)}, got {pooling!r}"
                    )
                if from_files and pooling != self.pooling:
                    notes.append(f"--pooling {pooling} overrides {self.pooling_from} ({self.pooling})")
                self.pooling, self.pooling_from = pooling, "--pooling"
            if normalize is not None:
                if from_files and normalize != self.normalize:
                    notes.append(f"--{'' if normalize else 'no-'}normalize overrides {pooling_files.MODULES}")
                self.normalize = normalize
        return notes


def input_kind(hf_config: dict) -> str:
    """text or image, from a Hugging Face config.json's model_type."""
    return "image" if hf_config.get("model_type") in IMAGE_MODEL_TYPES else "text"


def _classifier_meta(folder: Path, what: str) -> dict:
    meta_file, tensors = (
        folder / f"{run_files.CLASSIFIER}.json",
        folder / f"{run_files.CLASSIFIER}.safetensors",
    )
    if not meta_file.is_file() or not tensors.is_file():
        raise PMError(f"{folder}: {what} has no {meta_file.name} + {tensors.name}")
    meta = read_json(meta_file)
    if not isinstance(meta.get("labels"), list) or not meta["labels"]:
        raise PMError(f"{meta_file}: no labels")
    return meta


def inspect_merged(path: Path | str, base: str | None = None) -> MergedSource:
    """Read and check a model folder export can load: a RUN, a Hugging Face model folder (a full merged model,
    or any *ForSequenceClassification / *ForImageClassification / encoder), or a `pmserve merge --format
    delta|adapter` output on top of `base` (default: the base it records). Anything else is a PMError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise PMError(f"{path}: does not exist or is not a folder")
    if (path / peft_files.CONFIG).is_file():
        return _inspect_delta(path, "adapter", base)
    cfg_path = path / run_files.CONFIG
    if not cfg_path.is_file() and (path / run_files.MERGED).is_file():
        return _inspect_delta(path, "delta", base)
    if not cfg_path.is_file():
        raise PMError(
            f"{path}: not a model export can read (no config.json, merged.safetensors or adapter_config.json; "
            "expected a pmserve RUN, a Hugging Face model folder, or a `pmserve merge` output)"
        )
    cfg = read_json(cfg_path)
    if run_files.is_run_config(cfg):
        return _inspect_run(path, run_files.read_config(path))
    if "model_type" in cfg:
        return _inspect_full(path, cfg)
    raise PMError(f"{cfg_path}: neither a pmserve RUN's config nor a Hugging Face model config")


def check_model_type(cfg_path: Path, cfg: dict) -> None:
    """A model type export can trace, or a PMError that says which it is and which are supported."""
    t = cfg.get("model_type")
    if t not in TEXT_MODEL_TYPES + IMAGE_MODEL_TYPES:
        raise PMError(
            f"{cfg_path}: model_type {t!r} is not one export can trace (text: {', '.join(TEXT_MODEL_TYPES)}; "
            f"images: {', '.join(IMAGE_MODEL_TYPES)})"
        )


def _inspect_run(path: Path, cfg: dict) -> MergedSource:
    from ..backbone import resolve_model

    if not run_files.finished_tasks(path):
        raise PMError(f"{path}: a pmserve RUN without a finished task (no tasks/NN-name/task.json)")
    snap = run_files.snapshot(path)  # one state, whatever a writer does meanwhile
    finished, state = snap.finished, snap.state
    meta = _classifier_meta(state, "the RUN's state")
    infos = [read_json(p / run_files.TASK_INFO) for p in finished]
    merged = state / run_files.MERGED
    if cfg["method"] == "frozen":
        merged_file = None
    elif merged.is_file():
        merged_file = merged
    else:
        raise PMError(f"{state}: no merged.safetensors (the merged weights of a {cfg['method']} run)")
    try:
        model_dir = resolve_model(cfg["model"])
    except PMError as e:
        raise PMError(f"{path / run_files.CONFIG}: the RUN's base model is not readable here ({e})") from None
    hf_cfg = read_json(model_dir / run_files.CONFIG)
    check_model_type(model_dir / run_files.CONFIG, hf_cfg)
    kind = input_kind(hf_cfg)
    return MergedSource(
        path=path,
        kind="run",
        model=cfg["model"],
        input_kind=kind,
        max_length=int(cfg["max_length"]),
        labels=list(meta["labels"]),
        head=meta.get("kind", cfg.get("head", "linear")),
        classifier_dir=state,
        merged_file=merged_file,
        method=cfg["method"],
        alphas=[i.get("alpha") for i in infos],
        tasks=[i.get("name", p.name.split("-", 1)[1]) for i, p in zip(infos, finished)],
        data=cfg.get("data"),
        seed=int(cfg.get("seed", 0)),
        base_model=cfg["model"],
        adapter_dirs=[p for p in finished if (p / peft_files.CONFIG).is_file()],
        pooling=_default_pooling(kind),
    )


def _inspect_full(path: Path, cfg: dict) -> MergedSource:
    check_model_type(path / run_files.CONFIG, cfg)
    extra: dict = {}
    for name in FULL_METADATA:
        if (path / name).is_file():
            extra = read_json(path / name)
            break
    src = MergedSource(
        path=path,
        kind="full",
        model=str(path),
        input_kind=input_kind(cfg),
        max_length=int(extra.get("max_length", UNKNOWN_MAX_LENGTH)),
        labels=[],
        head=None,
        classifier_dir=None,
        method=extra.get("method"),
        alphas=list(extra.get("alphas") or []),
        tasks=list(extra.get("tasks") or []),
        data=extra.get("data"),
        seed=int(extra.get("seed", 0) or 0),
        base_model=extra.get("base_model"),
    )
    _set_output(src, path, path, cfg, max_length_known="max_length" in extra)
    return src


def _inspect_delta(path: Path, kind: str, base: str | None) -> MergedSource:
    """A `pmserve merge --format delta|adapter` output (or any PEFT LoRA folder) on top of its base model."""
    from ..adapters import base_fingerprint
    from ..backbone import resolve_model

    report = read_json(path / REPORT) if (path / REPORT).is_file() else {}
    meta = read_json(path / peft_files.META) if (path / peft_files.META).is_file() else {}
    if kind == "adapter":
        adapter = peft_files.read_adapter(path)  # headers only: the factors are read when the model loads
        if adapter.ignored:
            raise PMError(
                f"{adapter.tensors.path}: holds tensors that are neither LoRA factors nor PEFT modules_to_save "
                f"(e.g. {adapter.ignored[0]}), which export does not apply"
            )
        if adapter.kind == "chained":
            raise PMError(
                f"{path / peft_files.META}: a chained task adapter (trained on its RUN's merged model, not on "
                "W_0); export its RUN, or `pmserve merge` the RUN's tasks"
            )
    recorded = report.get("base") or {}
    fingerprint = recorded.get("fingerprint") or meta.get("base_fingerprint")
    if not base:
        wanted = [recorded.get("path"), recorded.get("model"), meta.get("base_model")]
        if kind == "adapter":
            wanted.append(read_json(path / peft_files.CONFIG).get("base_model_name_or_path"))
        wanted = [str(c) for c in wanted if c]
        base = next((c for c in wanted if c.startswith("builtin:") or Path(c).is_dir()), None)
        if base is None:
            raise PMError(
                f"--base: {path} is a `pmserve merge --format {kind}` output (W_hat - W_0 only); give the base "
                f"model it was merged on (it records {wanted[0] if wanted else 'none'}, not on this machine)"
            )
    model_dir = resolve_model(base)
    if fingerprint and fingerprint != base_fingerprint(model_dir):
        raise PMError(
            f"--base: {base} is not the model {path} was merged on (its fingerprint is "
            f"{base_fingerprint(model_dir)}, {path} records {fingerprint})"
        )
    cfg = read_json(model_dir / run_files.CONFIG)
    check_model_type(model_dir / run_files.CONFIG, cfg)
    src = MergedSource(
        path=path,
        kind=kind,
        model=base,
        input_kind=input_kind(cfg),
        max_length=UNKNOWN_MAX_LENGTH,
        labels=[],
        head=None,
        classifier_dir=None,
        merged_file=path / run_files.MERGED if kind == "delta" else None,
        merged_adapter=path if kind == "adapter" else None,
        saved_file=path / SAVED if kind == "delta" and (path / SAVED).is_file() else None,
        method=report.get("method") or meta.get("method"),
        alphas=list(report.get("alphas") or []),
        tasks=[str(i.get("name")) for i in report.get("inputs") or [] if isinstance(i, dict)],
        base_model=base,
    )
    _set_output(src, path, model_dir, cfg, max_length_known=False)
    return src


def _set_output(src: MergedSource, folder: Path, model_dir: Path, cfg: dict, max_length_known: bool) -> None:
    """What the model outputs, from what `folder` (the classifier's home) and `model_dir` (the weights') hold:
    pmserve's classifier when classifier.json is there; else the model's own classification head; else, for a
    bare encoder, embeddings pooled as its sentence-transformers files say (mean / [CLS] by default)."""
    cfg_path = model_dir / run_files.CONFIG
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else None
    src.architecture = arch
    if (folder / f"{run_files.CLASSIFIER}.json").is_file():
        meta = _classifier_meta(folder, "the merged model")
        if (folder / LABELS).is_file() and read_labels(folder / LABELS) != meta["labels"]:
            raise PMError(f"{folder / LABELS}: labels differ from classifier.json's")
        src.labels, src.head, src.classifier_dir = list(meta["labels"]), meta.get("kind", "linear"), folder
        src.pooling = _default_pooling(src.input_kind)
    elif arch and arch.endswith(HEAD_ARCHITECTURES):
        src.labels, src.head = _id2label(cfg_path, cfg), MODEL_HEAD
        single = cfg.get("problem_type") in (None, "single_label_classification") and len(src.labels) > 1
        src.scores = "softmax" if single else "logits"
    elif arch is None or arch.endswith(ENCODER_ARCHITECTURES):
        declared = pooling_files.read_pooling(model_dir)
        src.output = "embedding"
        if declared is None:
            src.pooling, src.pooling_from = _default_pooling(src.input_kind), "default"
        else:
            src.pooling, src.normalize = declared.pooling, declared.normalize
            src.pooling_from = str(declared.file)
            if declared.max_length and not max_length_known:
                src.max_length = declared.max_length
    else:
        raise PMError(
            f"{cfg_path}: architectures {arch}: a head export does not take (it takes "
            f"*{', *'.join(HEAD_ARCHITECTURES)}, pmserve's classifier.json, or a bare encoder as an embedding model)"
        )


def _default_pooling(kind: str) -> str:
    from ..backbone import default_pooling

    return default_pooling(kind)


def _id2label(cfg_path: Path, cfg: dict) -> list[str]:
    """The head's labels in score order, from config.json's id2label (LABEL_i when it has none, as transformers)."""
    id2label = cfg.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2)))]
    try:
        labels = [str(id2label[str(i)]) for i in range(len(id2label))]
    except (KeyError, TypeError):
        raise PMError(f"{cfg_path}: id2label keys must be the class indices 0..{len(id2label) - 1}") from None
    if "num_labels" in cfg and cfg["num_labels"] != len(labels):
        raise PMError(f"{cfg_path}: id2label has {len(labels)} labels, num_labels says {cfg['num_labels']}")
    return labels


def source_hashes(src: MergedSource) -> dict[str, str]:
    """sha256 of every weight file the exported model is made of: the model folder's (a full folder's, or the
    base's), then the merged delta or adapter applied to it. What the manifest records as the source's hash."""
    from ..backbone import resolve_model

    folder = resolve_model(src.model)
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    ]
    if src.merged_file is not None:
        files.append(src.merged_file)
    if src.saved_file is not None:
        files.append(src.saved_file)
    if src.merged_adapter is not None:
        files.append(src.merged_adapter / peft_files.WEIGHTS)
    return {p.name: sha256_file(p) for p in files}
