"""Fixtures: a tiny random BERT with its own word-level tokenizer, and tiny learnable text task folders."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest


def installed_packages_first() -> None:
    """Keep the checkout's root on sys.path, but after the installed packages: first, its kernels/ folder
    (pmserve.kernels) would be the module `kernels` and hide Hugging Face's `kernels`, which transformers
    imports. pytest appends the root (--import-mode=append, pyproject.toml) for the `tests` package;
    `python -m pytest` puts it first as the working directory, which this moves. Runs before any test module
    imports transformers."""
    root = Path(__file__).resolve().parents[1]
    ours = [p for p in sys.path if Path(p or ".").resolve() == root]
    sys.path[:] = [p for p in sys.path if p not in ours] + ours


installed_packages_first()

WORDS = {
    "animal": "dog cat horse cow sheep goat wolf fox bear deer",
    "food": "bread cheese apple pear soup rice bean cake milk egg",
    "tool": "hammer saw drill wrench chisel file axe knife plane vise",
    "place": "city town river lake hill field road park shore port",
    "time": "hour day week month year minute noon dawn dusk night",
    "feeling": "joy anger fear grief love hate pride shame calm awe",
}
FILLER = "a the of and in with some very small large old new".split()


def make_texts(label: str, n: int, rng: random.Random) -> list[str]:
    pool = WORDS[label].split()
    return [
        " ".join(rng.choice(pool) if k % 2 == 0 else rng.choice(FILLER) for k in range(rng.randint(3, 8)))
        for _ in range(n)
    ]


def write_tasks(
    root: Path, groups: list[list[str]], n_train: int = 24, n_test: int = 8, seed: int = 0
) -> Path:
    rng = random.Random(seed)
    for t, labels in enumerate(groups):
        d = root / f"t{t}"
        d.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            with (d / f"{split}.jsonl").open("w") as f:
                for y in labels:
                    for x in make_texts(y, n, rng):
                        f.write(json.dumps({"text": x, "label": y}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for v in WORDS.values() for w in v.split()} | set(FILLER)
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture()
def tiny_tasks(tmp_path) -> Path:
    return write_tasks(tmp_path / "data", [["animal", "food"], ["tool", "place"], ["time", "feeling"]])


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(d)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def digits(tiny_vit, tmp_path_factory):
    """A tiny image classifier bundle (the tiny ViT, 8x8 inputs), served as the model "digits"."""
    from pmserve.export import export_bundle
    from pmserve.train import TrainConfig, train

    root = tmp_path_factory.mktemp("digits")
    cfg = TrainConfig(
        data="builtin:digits:tasks=1,classes=2,train=8,test=4",
        model=str(tiny_vit),
        epochs=1,
        batch_size=8,
        rank=2,
        fisher_samples=8,
        head="linear",
    )
    train(cfg, root / "run", progress=False, log=lambda *_: None)
    export_bundle(root / "run", root / "digits")
    return root / "digits"


# TRITON_INTERPRET as pytest found it, before any test module was imported: tests/test_kernels_env.py checks the
# kernel tests (which need it set, in their child processes only) left this process's environment alone.
TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


DECODER_WORDS = "the a cat dog sat on mat and ran fast slow red blue big small house tree sky".split()


def make_causal_lm(folder: Path, arch: str, hidden: int = 32) -> Path:
    """A tiny random causal LM (llama or gpt2) with a word-level tokenizer and a chat template, saved in FOLDER;
    4 attention heads of HIDDEN / 4 each (ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    vocab = ["<pad>", "<unk>", "<s>", "</s>", *DECODER_WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}the{% endif %}"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        LlamaForCausalLM(cfg).save_pretrained(folder)
    else:
        cfg = GPT2Config(vocab_size=len(vocab), n_embd=hidden, n_layer=2, n_head=4, n_positions=128, **ids)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def genai_llama(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, bundle): a tiny Llama with heads 16 wide, which `pmserve export`'s --graph auto builds with
    ONNX Runtime GenAI's builder (a GroupQueryAttention graph)."""
    from pmserve.export import export_bundle

    root = tmp_path_factory.mktemp("genai")
    folder = make_causal_lm(root / "model", "llama", hidden=64)
    export_bundle(folder, root / "bundle")
    return folder, root / "bundle"


@pytest.fixture(scope="session")
def llama_bundle(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama exported to an fp32 decoder bundle, once per session."""
    from pmserve.export import export_bundle

    out = tmp_path_factory.mktemp("llama-bundle") / "bundle"
    export_bundle(tiny_llama, out)
    return out


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache of its own for the session: the one real conversion of the shipped GGUF file (about 40 s),
    shared by the tests that use builtin:smollm2."""
    old = os.environ.get("PMSERVE_CACHE")
    os.environ["PMSERVE_CACHE"] = str(tmp_path_factory.mktemp("pmserve-cache"))
    yield Path(os.environ["PMSERVE_CACHE"])
    if old is None:
        del os.environ["PMSERVE_CACHE"]
    else:
        os.environ["PMSERVE_CACHE"] = old
