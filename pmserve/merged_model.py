"""A merged model as one PyTorch module: backbone with W_hat baked in, pooling, and the classifier over all labels.

Two kinds of folder hold a merged model:
- a pmserve RUN: its last finished task folder has merged.safetensors (W_hat - W_0 of the adapted matrices, absent
  for `--method frozen`) on top of the base model named in config.json, and classifier.json/.safetensors;
- a `pmserve merge --format full` folder: a Hugging Face model whose weights already are W_hat, its tokenizer or
  image processor, classifier.json/.safetensors and optionally labels.json.
Both load into the same `InferenceModel(*inputs) -> scores [batch, classes]`, which export traces into ONNX,
eval and bench run, and ONNX Runtime is checked against. The unmerged model (base + every task's LoRA branch,
loaded with plain PEFT) and the base model with the same classifier are loaded here too, for bench.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Encoder, Preprocessor, load_encoder, resolve_model
from .errors import PMError
from .heads import LabelHead, Prototypes, Ridge, Scorer, load_scorer, scorer_kind

IMAGE_MODEL_TYPES = ("vit", "deit", "dinov2")  # the types backbone.load_encoder reads as image models
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order of the exported graph's inputs
# where a `pmserve merge --format full` folder may keep pmserve's own facts (alphas, max_length, base model, data)
FULL_METADATA = ("pmserve_merge.json", "pmserve.json", "merge.json")
TASK_FOLDER = re.compile(r"^\d+-.+")


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


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PMError(f"{path}: unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise PMError(f"{path}: expected a JSON object")
    return obj


def _input_kind(model_dir: Path) -> str:
    cfg = _read_json(model_dir / "config.json")
    return "image" if cfg.get("model_type") in IMAGE_MODEL_TYPES else "text"


def _classifier_meta(folder: Path, what: str) -> dict:
    if not (folder / "classifier.json").is_file() or not (folder / "classifier.safetensors").is_file():
        raise PMError(f"{folder}: {what} has no classifier.json + classifier.safetensors")
    meta = _read_json(folder / "classifier.json")
    if not isinstance(meta.get("labels"), list) or not meta["labels"]:
        raise PMError(f"{folder / 'classifier.json'}: no labels")
    return meta


def read_labels_file(path: Path) -> list[str]:
    """labels.json: a list (index -> label) or an object {"0": label, ...}."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PMError(f"{path}: unreadable ({e})") from None
    if isinstance(obj, dict):
        try:
            obj = [obj[str(i)] for i in range(len(obj))]
        except KeyError:
            raise PMError(f"{path}: keys must be the class indices 0..{len(obj) - 1}") from None
    if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
        raise PMError(f"{path}: expected a list of label strings")
    return obj


def inspect_merged(path: Path | str) -> MergedSource:
    """Read and check a RUN or a full merged folder; a folder that is neither is a PMError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise PMError(f"{path}: does not exist or is not a folder")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise PMError(
            f"{path}: not a merged model (no config.json; expected a pmserve RUN or a `pmserve merge --format full` folder)"
        )
    cfg = _read_json(cfg_path)
    if "data" in cfg and "method" in cfg and "model" in cfg:
        return _inspect_run(path, cfg)
    if "model_type" in cfg:
        return _inspect_full(path, cfg)
    raise PMError(f"{cfg_path}: neither a pmserve RUN's config nor a Hugging Face model config")


def _inspect_run(path: Path, cfg: dict) -> MergedSource:
    tasks_dir = path / "tasks"
    finished = sorted(
        p
        for p in (tasks_dir.iterdir() if tasks_dir.is_dir() else [])
        if p.is_dir() and TASK_FOLDER.match(p.name) and (p / "task.json").is_file()
    )
    if not finished:
        raise PMError(f"{path}: a pmserve RUN without a finished task (no tasks/NN-name/task.json)")
    final = finished[-1]
    meta = _classifier_meta(final, "the RUN's last task folder")
    infos = [_read_json(p / "task.json") for p in finished]
    merged = final / "merged.safetensors"
    if cfg["method"] == "frozen":
        merged_file = None
    elif merged.is_file():
        merged_file = merged
    else:
        raise PMError(f"{final}: no merged.safetensors (the merged weights of a {cfg['method']} run)")
    try:
        model_dir = resolve_model(cfg["model"])
    except PMError as e:
        raise PMError(f"{path / 'config.json'}: the RUN's base model is not readable here ({e})") from None
    return MergedSource(
        path=path,
        kind="run",
        model=cfg["model"],
        input_kind=_input_kind(model_dir),
        max_length=int(cfg.get("max_length", 64)),
        labels=list(meta["labels"]),
        head=meta.get("kind", cfg.get("head", "linear")),
        classifier_dir=final,
        merged_file=merged_file,
        method=cfg["method"],
        alphas=[i.get("alpha") for i in infos],
        tasks=[i.get("name", p.name.split("-", 1)[1]) for i, p in zip(infos, finished)],
        data=cfg.get("data"),
        seed=int(cfg.get("seed", 0)),
        base_model=cfg["model"],
        adapter_dirs=[p for p in finished if (p / "adapter_config.json").is_file()],
    )


def _inspect_full(path: Path, cfg: dict) -> MergedSource:
    if not (path / "classifier.json").is_file():
        raise PMError(
            f"{path}: a Hugging Face model without classifier.json, not a merged model "
            "(`pmserve merge --format full` writes one)"
        )
    meta = _classifier_meta(path, "the merged model")
    if (path / "labels.json").is_file() and read_labels_file(path / "labels.json") != meta["labels"]:
        raise PMError(f"{path / 'labels.json'}: labels differ from classifier.json's")
    extra: dict = {}
    for name in FULL_METADATA:
        if (path / name).is_file():
            extra = _read_json(path / name)
            break
    return MergedSource(
        path=path,
        kind="full",
        model=str(path),
        input_kind="image" if cfg.get("model_type") in IMAGE_MODEL_TYPES else "text",
        max_length=int(extra.get("max_length", 128)),
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


# ---------------------------------------------------------------- the classifier as torch ops


class LinearScores(nn.Module):
    """feats @ W^T + b (the linear training head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", bias.float().contiguous())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias


class CosineScores(nn.Module):
    """scale * cos(feats, rows): the cosine head (scale 16) and nearest prototype (scale 1); rows pre-normalised."""

    def __init__(self, rows: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("rows", F.normalize(rows.float(), dim=-1).contiguous())
        self.scale = float(scale)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        s = F.normalize(feats, dim=-1) @ self.rows.T
        return s if self.scale == 1.0 else self.scale * s


class RidgeScores(nn.Module):
    """RanPAC: relu(feats @ P) @ W, with W = (G + lambda I)^-1 Q solved once in float64, then stored in fp32."""

    def __init__(self, projection: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("projection", projection.float().contiguous())
        self.register_buffer("weight", weight.float().contiguous())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.relu(feats @ self.projection) @ self.weight


def scorer_module(scorer: Scorer) -> nn.Module:
    """The inference classifier as a traceable module with the same scores as `scorer.scores`."""
    if isinstance(scorer, LabelHead):
        if scorer.kind == "cosine":
            return CosineScores(scorer.weight.data, scorer.scale)
        return LinearScores(scorer.weight.data, scorer.bias.data)
    if isinstance(scorer, Prototypes):
        return CosineScores(scorer.means())
    if isinstance(scorer, Ridge):
        w = scorer.W if scorer.W is not None else scorer.solve(scorer.lam)
        return RidgeScores(scorer.P, w)
    raise TypeError(f"no module for classifier {type(scorer).__name__}")


class InferenceModel(nn.Module):
    """Inputs (in `input_names` order) -> pooled features -> scores over every class seen, in `labels` order."""

    def __init__(self, encoder: Encoder, classifier: nn.Module, input_names: list[str], labels: list[str]):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier
        self.input_names, self.labels = list(input_names), list(labels)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(**dict(zip(self.input_names, inputs))))

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(*[batch[n] for n in self.input_names])


def input_names(prep: Preprocessor) -> list[str]:
    """The model inputs this preprocessor produces, in the exported graph's order."""
    if prep.kind == "image":
        return ["pixel_values"]
    keys = prep(["a"]).keys()
    return [n for n in TEXT_INPUTS if n in keys]


def _classifier(src: MergedSource, dim: int) -> nn.Module:
    scorer = load_scorer(src.classifier_dir)
    if scorer.dim != dim:
        raise PMError(
            f"{src.classifier_dir / 'classifier.json'}: classifier features have size {scorer.dim}, "
            f"but the model's are {dim}"
        )
    if scorer_kind(scorer) != src.head:
        src.head = scorer_kind(scorer)
    return scorer_module(scorer)


def _set_attention(encoder: Encoder, attn: str | None) -> None:
    if attn and hasattr(encoder.model, "set_attn_implementation"):
        encoder.model.set_attn_implementation(attn)


@torch.no_grad()
def _apply_merged(encoder: Encoder, merged_file: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        merged = load_file(str(merged_file))
    except (OSError, SafetensorError) as e:
        raise PMError(f"{merged_file}: unreadable ({e})") from None
    mods = dict(encoder.model.named_modules())
    for name, d in merged.items():
        w = getattr(mods.get(name), "weight", None)
        if w is None or tuple(w.shape) != tuple(d.shape):
            raise PMError(f"{merged_file}: {name} does not match a weight of the base model")
        w.add_(d.to(w.dtype))  # W_0 + (W_hat - W_0), as adapters.set_merged writes it


def load_inference_model(
    src: MergedSource | Path | str, attn: str | None = None
) -> tuple[InferenceModel, Preprocessor]:
    """The merged model of a RUN or full folder, in eval mode; `attn` picks the attention implementation."""
    src = src if isinstance(src, MergedSource) else inspect_merged(src)
    encoder, prep, _ = load_encoder(src.model, src.input_kind, src.max_length)
    _set_attention(encoder, attn)
    if src.merged_file is not None:
        _apply_merged(encoder, src.merged_file)
    model = InferenceModel(encoder, _classifier(src, encoder.hidden_size), input_names(prep), src.labels)
    return model.eval(), prep


def load_base_model(src: MergedSource, attn: str | None = None) -> InferenceModel | None:
    """The pretrained W_0 with the same classifier (a latency reference), or None when W_0 is not known."""
    if not src.base_model:
        return None
    encoder, prep, _ = load_encoder(src.base_model, src.input_kind, src.max_length)
    _set_attention(encoder, attn)
    return InferenceModel(
        encoder, _classifier(src, encoder.hidden_size), input_names(prep), src.labels
    ).eval()


def load_unmerged_model(src: MergedSource, attn: str | None = None) -> InferenceModel | None:
    """W_0 with every task's LoRA adapter loaded by plain PEFT as a separate adapter, all active at once.

    Task t's branch is scaled by its alpha_t (LoraLayer.set_scale), so the sum of branches is
    sum_t alpha_t * scaling * B_t A_t = W_hat - W_0 exactly, and the scores equal the merged model's up to
    rounding: the same function, computed unmerged. None when there are no adapters (a frozen run, a full folder).
    """
    if src.kind != "run" or not src.adapter_dirs:
        return None
    import warnings

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    encoder, prep, _ = load_encoder(src.model, src.input_kind, src.max_length)
    _set_attention(encoder, attn)
    names = [f"task{i}" for i in range(len(src.adapter_dirs))]
    alphas = [1.0 if a is None else float(a) for a in src.alphas[: len(names)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft_model = PeftModel.from_pretrained(
                encoder.model, str(src.adapter_dirs[0]), adapter_name=names[0]
            )
            for d, n in zip(src.adapter_dirs[1:], names[1:]):
                peft_model.load_adapter(str(d), adapter_name=n)
        except (OSError, ValueError, KeyError) as e:
            raise PMError(
                f"{src.path}: cannot load the task adapters with PEFT ({str(e).splitlines()[0]})"
            ) from None
        peft_model.base_model.set_adapter(names)
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for n, a in zip(names, alphas):
                if n in m.scaling:
                    m.set_scale(n, a)
    encoder.model = peft_model.eval()
    return InferenceModel(
        encoder, _classifier(src, encoder.hidden_size), input_names(prep), src.labels
    ).eval()
