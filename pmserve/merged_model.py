"""A model to deploy as one PyTorch module: backbone with W_hat baked in, pooling, and what scores it.

Every source export reads (formats.merged: a RUN, a Hugging Face folder, a merge's delta or adapter on its base)
loads into the same `InferenceModel(*inputs) -> output`, which export traces into ONNX, eval and bench run, and
ONNX Runtime is checked against. The output is `scores` [batch, classes] (pmserve's classifier over the pooled
features, or the model's own head's logits or softmax) or `embedding` [batch, dim] (the pooled, optionally
normalised features). W_hat = W_0 + D is written by adapters.apply_delta, whatever D came from; PEFT's
modules_to_save that a merge carried (or a single adapter holds) replace the base's tensors. The unmerged model
(base + every task's LoRA branch, loaded with plain PEFT) and the base model with the same head are loaded here
too, for bench.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import apply_delta, match_module
from .backbone import HEAD, Encoder, Preprocessor, load_encoder
from .errors import PMError
from .formats.merged import MODEL_HEAD, MergedSource, inspect_merged
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
from .rejection import FIT, OUT_OF_SCOPE, SCORES, top_cosines

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
    """RanPAC: relu(feats @ P) @ W, with W = (G + lambda I)^-1 Q solved once in float64, then stored in fp32.
    With `columns` (Q's columns, normalised: a classifier that rejects by fit) also each row's fit, the largest
    cosine of relu(feats @ P) with them (pmserve.rejection), as a second output."""

    def __init__(self, projection: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("projection", projection.float().contiguous())
        self.register_buffer("weight", weight.float().contiguous())
        self.has_fit = columns is not None
        if self.has_fit:
            self.register_buffer("columns", F.normalize(columns.float(), dim=0).contiguous())

    def forward(self, feats: torch.Tensor):
        if not self.has_fit:
            return ridge_scores(feats, self.projection, self.weight)
        h = torch.relu(feats @ self.projection)
        return h @ self.weight, top_cosines(h, self.columns)


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
        by_fit = scorer.reject and scorer.reject_score == "cosine"
        return RidgeScores(scorer.P, w, scorer.Q if by_fit else None)
    raise TypeError(f"no module for classifier {type(scorer).__name__}")


class Softmax(nn.Module):
    """Probabilities from a classification head's logits (export --scores softmax)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)


class InferenceModel(nn.Module):
    """Inputs (in `input_names` order) -> the encoder's features (pooled, or a head's logits) -> `classifier` ->
    the output: `scores` over every class in `labels` order (and, for a classifier that rejects by fit, each
    row's fit: `outputs`), or, for an embedding model (no labels, no classifier), `embedding`."""

    def __init__(
        self,
        encoder: Encoder,
        classifier: nn.Module | None,
        input_names: list[str],
        labels: list[str],
        output: str = "scores",
    ):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier if classifier is not None else nn.Identity()
        self.input_names, self.labels, self.output = list(input_names), list(labels), output
        self.has_fit = bool(getattr(self.classifier, "has_fit", False))

    @property
    def outputs(self) -> list[str]:
        """The graph's outputs: `output`, then FIT for a classifier that rejects by fit."""
        return [self.output] + [FIT] * self.has_fit

    def forward(self, *inputs: torch.Tensor):
        return self.classifier(self.encoder(**dict(zip(self.input_names, inputs))))

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The output (class scores, or embeddings) of one batch of model inputs; with a fit, it is one more
        column, last (the layout predict.Model's rows have)."""
        out = self(*[batch[n] for n in self.input_names])
        return torch.cat([out[0], out[1][:, None]], 1) if self.has_fit else out


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


def saved_rejection(src: MergedSource) -> dict | None:
    """The source's out-of-scope rule, as a bundle's manifest keeps it: answer `label` where `score` (the fit,
    or the top class score) is below `threshold` (pmserve.rejection); None: its classifier does not reject."""
    if src.classifier_dir is None or src.head != "ridge":
        return None
    scorer = load_scorer(src.classifier_dir)
    if not isinstance(scorer, Ridge) or not scorer.reject:
        return None
    return {"threshold": scorer.threshold(), "label": OUT_OF_SCOPE, "score": SCORES[scorer.reject_score]}


def _after_encoder(src: MergedSource, encoder: Encoder) -> nn.Module | None:
    """What turns the encoder's output into the model's: pmserve's classifier, a softmax over the model's own
    logits, or nothing (logits as they are; embeddings)."""
    if src.classifier_dir is not None:
        return _classifier(src, encoder.hidden_size)
    if src.head == MODEL_HEAD and src.scores == "softmax":
        return Softmax()
    return None


def _set_attention(encoder: Encoder, attn: str | None) -> None:
    if attn and hasattr(encoder.model, "set_attn_implementation"):
        encoder.model.set_attn_implementation(attn)


@torch.no_grad()
def _apply_deltas(model: nn.Module, deltas, where: Path) -> None:
    """W_0 + D for every (module name, D) of `deltas`; a name is matched allowing a wrapper prefix on either side
    (a delta made on BertForSequenceClassification names `bert.encoder...`, a BertModel `encoder...`)."""
    mods = dict(model.named_modules())
    for name, d in deltas:
        try:
            w = getattr(mods[match_module(name, mods, str(where))], "weight", None)
        except PMError:
            w = None
        if w is None or tuple(w.shape) != tuple(d.shape):
            raise PMError(f"{where}: {name} does not match a weight of the base model")
        w.copy_(apply_delta(w, d))


def _merged_deltas(merged_file: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(merged_file)).items()
    except (OSError, SafetensorError) as e:
        raise PMError(f"{merged_file}: unreadable ({e})") from None


def _adapter_deltas(folder: Path):
    """Each adapted module's scaling * B @ A, read and computed as `pmserve merge` computes it (formats.peft)."""
    from .formats.peft import read_adapter

    a = read_adapter(folder)
    return ((m, a.delta(m)) for m in a.modules)


def _saved_tensors(src: MergedSource) -> tuple[list[tuple[str, torch.Tensor]], Path | None]:
    """The PEFT modules_to_save a delta (modules_to_save.safetensors) or an adapter carries, by parameter name,
    and the file they came from."""
    if src.saved_file is not None:
        return list(_merged_deltas(src.saved_file)), src.saved_file
    if src.merged_adapter is not None:
        from .formats.peft import read_adapter

        a = read_adapter(src.merged_adapter)
        return [(n, a.saved_tensor(n)) for n in a.saved], a.tensors.path
    return [], None


def _supplies(name: str, saved: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or s.endswith("." + name) for s in saved)


def _head_encoder(spec: str, src: MergedSource, saved: list[str]) -> tuple[Encoder, Preprocessor]:
    """backbone.load_encoder's head model, for a base whose head comes from PEFT's modules_to_save: a checkpoint
    without it (a bert-base-* with config.json set to *ForSequenceClassification) is fine here, since every
    parameter it lacks is one the saved tensors supply; anything else missing is still a PMError."""
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    from .backbone import resolve_model

    path = resolve_model(spec)
    auto = (
        AutoModelForImageClassification if src.input_kind == "image" else AutoModelForSequenceClassification
    )
    try:
        config = AutoConfig.from_pretrained(str(path))
        model, info = auto.from_pretrained(
            str(path), config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise PMError(f"{spec}: cannot load the model ({str(e).splitlines()[0]})") from None
    lacking = [k for k in info.get("missing_keys") or () if not _supplies(k, saved)]
    lacking += [k for k, *_ in info.get("mismatched_keys") or () if not _supplies(k, saved)]
    if lacking:
        raise PMError(f"{path}: the weights have no {sorted(lacking)[0]} (the model's head would be random)")
    model.eval()
    return Encoder(model, src.input_kind, HEAD, src.normalize), Preprocessor(
        path, src.input_kind, src.max_length
    )


@torch.no_grad()
def _apply_saved(model: nn.Module, saved: list[tuple[str, torch.Tensor]], where: Path) -> None:
    """Each saved tensor replaces the model's parameter of its name (a wrapper prefix allowed either side)."""
    params = dict(model.named_parameters())
    for name, t in saved:
        try:
            p = params[match_module(name, params, str(where))]
        except PMError:
            arch = type(model).__name__
            raise PMError(
                f"{where}: saves {name} (PEFT modules_to_save), which the base model ({arch}) has no place for; "
                "give a --base *ForSequenceClassification folder whose config.json has the adapter's labels"
            ) from None
        if tuple(p.shape) != tuple(t.shape):
            n = getattr(model.config, "num_labels", None)
            raise PMError(
                f"{where}: saves {name} as {list(t.shape)}, but the base model's is {list(p.shape)} (its "
                f"config.json's id2label has {n} labels); give a --base whose id2label has the adapter's labels"
            )
        p.copy_(t.to(p.dtype))


def _load(
    src: MergedSource, spec: str, attn: str | None, deltas: bool
) -> tuple[InferenceModel, Preprocessor]:
    pooling = HEAD if src.head == MODEL_HEAD else src.pooling
    saved, saved_from = _saved_tensors(src) if deltas else ([], None)
    if saved and pooling == HEAD:
        encoder, prep = _head_encoder(spec, src, [n for n, _ in saved])
    else:
        encoder, prep, _ = load_encoder(spec, src.input_kind, src.max_length, pooling, src.normalize)
    _set_attention(encoder, attn)
    if deltas and src.merged_file is not None:
        _apply_deltas(encoder.model, _merged_deltas(src.merged_file), src.merged_file)
    if deltas and src.merged_adapter is not None:
        _apply_deltas(encoder.model, _adapter_deltas(src.merged_adapter), src.merged_adapter)
    if saved:
        _apply_saved(encoder.model, saved, saved_from)
    output = "embedding" if src.output == "embedding" else "scores"
    model = InferenceModel(encoder, _after_encoder(src, encoder), input_names(prep), src.labels, output)
    return model.eval(), prep


def load_inference_model(
    src: MergedSource | Path | str, attn: str | None = None
) -> tuple[InferenceModel, Preprocessor]:
    """The model of any source export reads, W_hat applied, in eval mode; `attn` picks the attention
    implementation."""
    src = src if isinstance(src, MergedSource) else inspect_merged(src)
    return _load(src, src.model, attn, deltas=True)


def load_base_model(src: MergedSource, attn: str | None = None) -> InferenceModel | None:
    """The pretrained W_0 with the same head and pooling (a latency reference), or None when W_0 is not known."""
    if not src.base_model:
        return None
    return _load(src, src.base_model, attn, deltas=False)[0]


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
