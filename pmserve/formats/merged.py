"""A merged model on disk: a RUN, or a `pmserve merge` output folder, read and checked without loading weights.

What `pmserve merge` writes (any --format): merge_report.json (method, alphas, inputs with sha256, per-module
norms, notes), README.md (the model card), the classifier (classifier.*, head.*, labels.json) and
- delta: merged.safetensors, W_hat - W_0 per adapted module;
- adapter: one PEFT LoRA (formats.peft);
- full: a Hugging Face model folder with W_hat baked in, its tokenizer or image processor, and
  pmserve_merge.json (method, alphas, tasks, data, max_length, base model).

Two kinds of folder hold a model export can load: a RUN (its last finished task folder has merged.safetensors on
top of the base model named in config.json, absent for `--method frozen`) and a full folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import UNKNOWN_MAX_LENGTH
from ..errors import PMError
from . import LABELS, MODEL_CARD, read_json, read_labels
from . import peft as peft_files
from . import run as run_files

META = "pmserve_merge.json"
REPORT = "merge_report.json"
# where a full folder may keep pmserve's own facts (alphas, max_length, base model, data); the first found counts
FULL_METADATA = (META, "pmserve.json", "merge.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
IMAGE_MODEL_TYPES = ("vit", "deit", "dinov2")  # the types backbone.load_encoder reads as image models


def is_companion(name: str) -> bool:
    """Whether a base model's file travels with a full merged model: config, tokenizer, processor; not the
    weights (rewritten), their index, or the base's model card (replaced by the merge's)."""
    return not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json") and name != MODEL_CARD


@dataclass
class MergedSource:
    """What a merged-model folder holds, read and checked without loading any weights."""

    path: Path
    kind: str  # "run" or "full"
    model: str  # what load_encoder reads: the RUN's base model, or the full folder itself
    input_kind: str  # "text" or "image"
    max_length: int
    labels: list[str]
    head: str  # the classifier's kind: linear, cosine, prototype or ridge
    classifier_dir: Path
    merged_file: Path | None = None  # RUN: W_hat - W_0; None for a frozen run or a full folder
    method: str | None = None
    alphas: list = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    data: str | None = None  # the task sequence whose test sets measure it, when known
    seed: int = 0
    base_model: str | None = None  # the pretrained W_0, when known (RUN: its model; full: from metadata)
    adapter_dirs: list[Path] = field(default_factory=list)  # RUN: every task's PEFT adapter, in order

    def describe(self) -> dict:
        """The facts a bundle's manifest records about where it came from."""
        return {
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "model": self.model if self.kind == "run" else str(Path(self.model).resolve()),
            "base_model": self.base_model,
            "method": self.method,
            "head": self.head,
            "tasks": self.tasks,
            "data": self.data,
            "seed": self.seed,
            "max_length": self.max_length,
        }


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


def inspect_merged(path: Path | str) -> MergedSource:
    """Read and check a RUN or a full merged folder; a folder that is neither is a PMError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise PMError(f"{path}: does not exist or is not a folder")
    cfg_path = path / run_files.CONFIG
    if not cfg_path.is_file():
        raise PMError(
            f"{path}: not a merged model (no config.json; expected a pmserve RUN or a `pmserve merge --format full` folder)"
        )
    cfg = read_json(cfg_path)
    if run_files.is_run_config(cfg):
        return _inspect_run(path, run_files.read_config(path))
    if "model_type" in cfg:
        return _inspect_full(path, cfg)
    raise PMError(f"{cfg_path}: neither a pmserve RUN's config nor a Hugging Face model config")


def _inspect_run(path: Path, cfg: dict) -> MergedSource:
    from ..backbone import resolve_model

    finished = run_files.finished_tasks(path)
    if not finished:
        raise PMError(f"{path}: a pmserve RUN without a finished task (no tasks/NN-name/task.json)")
    state = run_files.state_dir(path)
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
    return MergedSource(
        path=path,
        kind="run",
        model=cfg["model"],
        input_kind=input_kind(read_json(model_dir / run_files.CONFIG)),
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
    )


def _inspect_full(path: Path, cfg: dict) -> MergedSource:
    if not (path / f"{run_files.CLASSIFIER}.json").is_file():
        raise PMError(
            f"{path}: a Hugging Face model without classifier.json, not a merged model "
            "(`pmserve merge --format full` writes one)"
        )
    meta = _classifier_meta(path, "the merged model")
    if (path / LABELS).is_file() and read_labels(path / LABELS) != meta["labels"]:
        raise PMError(f"{path / LABELS}: labels differ from classifier.json's")
    extra: dict = {}
    for name in FULL_METADATA:
        if (path / name).is_file():
            extra = read_json(path / name)
            break
    return MergedSource(
        path=path,
        kind="full",
        model=str(path),
        input_kind=input_kind(cfg),
        max_length=int(extra.get("max_length", UNKNOWN_MAX_LENGTH)),
        labels=list(meta["labels"]),
        head=meta.get("kind", "linear"),
        classifier_dir=path,
        method=extra.get("method"),
        alphas=list(extra.get("alphas") or []),
        tasks=list(extra.get("tasks") or []),
        data=extra.get("data"),
        seed=int(extra.get("seed", 0) or 0),
        base_model=extra.get("base_model"),
    )
