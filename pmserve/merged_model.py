"""A merged model as one PyTorch module: backbone with W_hat baked in, pooling, and the classifier over all labels.

Two kinds of folder hold a merged model, a RUN and a `pmserve merge --format full` folder (formats.merged
reads and checks them). Both load into the same `InferenceModel(*inputs) -> scores [batch, classes]`, which
export traces into ONNX, eval and bench run, and ONNX Runtime is checked against. The unmerged model (base + every task's LoRA branch,
loaded with plain PEFT) and the base model with the same classifier are loaded here too, for bench.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import apply_delta
from .backbone import Encoder, Preprocessor, load_encoder
from .errors import PMError
from .formats.merged import MergedSource, inspect_merged
from .heads import (
    LabelHead,
    Prototypes,
    Ridge,
    Scorer,
    cosine_scores,
    linear_scores,
    load_scorer,
    ridge_scores,
    scorer_kind,
)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order of the exported graph's inputs


# ---------------------------------------------------------------- the classifier as torch ops


class LinearScores(nn.Module):
    """feats @ W^T + b (the linear training head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", bias.float().contiguous())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return linear_scores(feats, self.weight, self.bias)


class CosineScores(nn.Module):
    """scale * cos(feats, rows): the cosine head (scale 16) and nearest prototype (scale 1); rows pre-normalised."""

    def __init__(self, rows: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("rows", F.normalize(rows.float(), dim=-1).contiguous())
        self.scale = float(scale)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return cosine_scores(feats, self.rows, self.scale)


class RidgeScores(nn.Module):
    """RanPAC: relu(feats @ P) @ W, with W = (G + lambda I)^-1 Q solved once in float64, then stored in fp32."""

    def __init__(self, projection: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("projection", projection.float().contiguous())
        self.register_buffer("weight", weight.float().contiguous())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return ridge_scores(feats, self.projection, self.weight)


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
        w.copy_(apply_delta(w, d))


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
