"""A decoder language model (a causal LM) as one ONNX graph with a key/value cache, as Optimum's merged decoder lays
it out, so that ONNX Runtime runs both the prompt and every decode step through one session.

Graph inputs: input_ids and position_ids [batch, sequence], attention_mask [batch, past + sequence] (1 = a real
token; left padding is 0), past_key_values.N.key / .value [batch, kv_heads, past, head_dim] for every layer N
(past = 0 for the prompt). Outputs: logits [batch, sequence, vocab] and present.N.key / .value [batch, kv_heads,
past + sequence, head_dim], the cache to feed back at the next step.

Since issue 38 this is the graph of the models ONNX Runtime GenAI's builder does not take (decoder_export.
choose_graph: GPT-2, heads not a multiple of 16 wide, architectures not measured through the builder): the builder's
GroupQueryAttention graph decodes SmolLM2 1.2 to 1.9x faster (BENCHMARKS.md). The wrapper is a dozen lines: it
rebuilds transformers' DynamicCache from flat tensors, so the TorchScript exporter traces the model's own attention
and mask code, for any architecture transformers runs (Optimum's exporter, the other candidate, pins transformers
< 5). The trace uses a padded row and a non-empty
past, so no branch that holds only for unpadded or empty-cache inputs is baked into the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import is_decoder
from .errors import PMError
from .onnx_trace import export_graph

OPSETS = range(14, 21)


def is_causal_lm(path: Path | str) -> bool:
    """Whether PATH (a folder, or `builtin:smollm2`) holds a Hugging Face causal language model."""
    spec = str(path)
    if spec.startswith("builtin:"):
        from .gguf_models import GGUF_MODELS

        return spec[len("builtin:") :] in GGUF_MODELS
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and is_decoder(config)


@dataclass(frozen=True)
class KVLayout:
    """The cache's shape and the graph's names, read from a model config or a bundle's manifest."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KVLayout:
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv = getattr(config, "num_key_value_heads", None) or heads
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(int(layers), int(kv), int(head_dim))

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]


def load_causal_lm(spec: Path | str, attn: str | None = "eager"):
    """(model in eval mode, fp32; tokenizer; folder) of a causal LM folder or `builtin:smollm2`: what export and
    decoder training both load. `attn`: "eager" for the exporter, which traces plain MatMul/Softmax that ONNX
    Runtime runs everywhere; None for transformers' default (training)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .backbone import resolve_model

    folder = resolve_model(str(spec))
    try:
        config = AutoConfig.from_pretrained(str(folder))
        if not is_decoder(config):
            raise PMError(
                f"{spec}: not a causal language model ({config.model_type}); generative tasks need a decoder"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), config=config, attn_implementation=attn, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise PMError(f"{spec}: cannot load the causal LM ({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model, tok, folder


class CachedDecoder(torch.nn.Module):
    """model(input_ids, attention_mask, position_ids, *past) -> (logits, *present), flat tensors in and out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layout = KVLayout.of(model.config)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layout.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def trace_decoder(model: torch.nn.Module, path: Path, opset: int) -> KVLayout:
    """Write MODEL as the one-graph KV-cache decoder to PATH (batch, sequence, past axes dynamic)."""
    wrapper = CachedDecoder(model).eval()
    lay = wrapper.layout
    b, past, seq = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (b, seq), generator=g)
    mask = torch.ones(b, past + seq, dtype=torch.long)
    mask[0, 0] = 0  # a padded row: the mask code must take its general path
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(b, lay.kv_heads, past, lay.head_dim, generator=g) for _ in lay.past_names]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{n: {0: "batch", 2: "past_sequence"} for n in lay.past_names},
        **{n: {0: "batch", 2: "total_sequence"} for n in lay.present_names},
    }
    export_graph(
        wrapper,
        (ids, mask, pos, *kv),
        path,
        lay.input_names,
        lay.output_names,
        axes,
        opset,
        f"{model.config.model_type} (causal LM)",
    )
    model.eval()  # the exporter restores the wrapper's mode onto the model; keep dropout off whatever it was
    return lay
