"""Tensor files one tensor at a time: lazy safetensors reading and streaming safetensors writing.

`pmserve merge` reads adapters, Fisher files and base models that may be far larger than memory, so nothing here
ever holds a whole file: a reader gives one tensor per call, a writer takes one tensor per call. The maths
(pmserve.merging) never sees a file, and this module never sees a merge method.

Reading goes through safetensors' `safe_open` (memory-mapped, lazy). A mapped file's touched pages count towards
the process's resident memory for as long as the mapping lives, so large files are reopened for every tensor
(`keep_open=False`): the mapping of one tensor is dropped before the next is read. Opening costs one header
parse, which is small next to reading a weight matrix. safe_open also checks the header against the file size,
so a truncated file is caught when it is opened, before any tensor is used.

Writing computes the whole header (names, dtypes, shapes, offsets) first, then appends each tensor's bytes, so a
model is written with one tensor in memory; files past `max_shard_bytes` are split into Hugging Face's shard
layout with a `*.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PMError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _safetensors_error():
    from safetensors import SafetensorError

    return SafetensorError


class LazyTensors:
    """One safetensors file: names, shapes and dtypes from its header, each tensor read only when asked for.

    Any unreadable file (missing, truncated, not safetensors, an unknown dtype) is a PMError naming it.
    """

    def __init__(self, path: Path | str, keep_open: bool = False):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise PMError(f"{self.path}: missing")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        try:
            handle = safe_open(str(self.path), framework="pt")
            self.metadata = handle.metadata() or {}
            for k in handle.keys():
                sl = handle.get_slice(k)
                name = sl.get_dtype()
                if name not in DTYPES:
                    raise PMError(f"{self.path}: tensor {k} has unsupported dtype {name}")
                self.shapes[k], self.dtypes[k] = tuple(sl.get_shape()), DTYPES[name]
        except (OSError, _safetensors_error()) as e:
            raise PMError(f"{self.path}: not a readable safetensors file ({_first_line(e)})") from None
        self._handle = handle if keep_open else None
        del handle

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, copied out of the file (so it outlives the mapping)."""
        from safetensors import safe_open

        try:
            if self._handle is not None:
                return self._handle.get_tensor(key)
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(key)
            del f  # drop the mapping now, not at the next garbage collection
            return t
        except (OSError, _safetensors_error()) as e:
            raise PMError(f"{self.path}: cannot read tensor {key} ({_first_line(e)})") from None

    def close(self) -> None:
        self._handle = None


class InMemoryTensors:
    """Tensors already computed (e.g. a Fisher from --data), behind LazyTensors' reading interface."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path | str = "<memory>"):
        self.path = Path(path)
        self._tensors = tensors
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self.dtypes = {k: v.dtype for k, v in tensors.items()}
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        pass


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class ModelWeights:
    """A Hugging Face model folder's safetensors weights: one file, or shards named by an index file."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / self.INDEX
        self.files: dict[str, LazyTensors] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name, in the files' order
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise PMError(f"{index}: unreadable index ({_first_line(e)})") from None
            names = list(dict.fromkeys(weight_map.values()))
            for name in names:
                self.files[name] = LazyTensors(self.folder / name)
            for name in names:  # the order the shards hold them, shard by shard
                for k in self.files[name].keys():
                    if weight_map.get(k) == name:
                        self.where[k] = name
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise PMError(
                    f"{index}: names {missing[0]} in {weight_map[missing[0]]}, which does not hold it"
                )
        elif (self.folder / self.SINGLE).is_file():
            self.files[self.SINGLE] = LazyTensors(self.folder / self.SINGLE)
            self.where = dict.fromkeys(self.files[self.SINGLE].keys(), self.SINGLE)
        else:
            raise PMError(
                f"{self.folder}: no safetensors weights ({self.SINGLE} or {self.INDEX}); "
                "save the base with save_pretrained(..., safe_serialization=True)"
            )

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[self.where[key]].shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.files[self.where[key]].dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get(key)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(self.shape(k), self.dtype(k)) for k in self.where)

    def weight_files(self) -> list[Path]:
        names = list(self.files) + ([self.INDEX] if (self.folder / self.INDEX).is_file() else [])
        return [self.folder / n for n in names]


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units, like transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise PMError(f"--max-shard-size: expected a size such as 5GB or 500MB, got {text!r}")
    base = 1024 if m.group(3) == "IB" else 1000
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * base**power)


class SafetensorsWriter:
    """Writes planned tensors in order, one at a time, into `stem.safetensors` or HF-style shards.

    The plan (`specs`) fixes every name, dtype and shape up front, so each file's header is written first and the
    tensors follow as they come; `write` must be called in the plan's order. `close` checks that every planned
    tensor arrived and writes `stem.safetensors.index.json` when there is more than one shard.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        stem: str = "model",
        max_shard_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.folder, self.stem = Path(folder), stem
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if max_shard_bytes and shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self.names = (
            [f"{stem}.safetensors"]
            if n == 1
            else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self._queue: Iterator[tuple[int, TensorSpec]] = iter(
            [(i, s) for i, shard in enumerate(shards) for s in shard]
        )
        self._file = None
        self._open_index = -1
        self.total_bytes = sum(s.nbytes for s in specs)

    def _header(self, shard: list[TensorSpec]) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for s in shard:
            header[s.name] = {
                "dtype": DTYPE_NAMES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            i, spec = next(self._queue)
        except StopIteration:
            raise ValueError(f"{name}: not in the plan, or written twice") from None
        if spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if i != self._open_index:
            self._close_file()
            self._file = open(self.folder / self.names[i], "wb")
            self._file.write(self._header(self.shards[i]))
            self._open_index = i
        if tensor.numel():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[Path]:
        """Finish: every planned tensor must have been written. Returns the files written (index included)."""
        left = next(self._queue, None)
        self._close_file()
        if left is not None:
            raise ValueError(f"{left[1].name}: planned but never written")
        if self._open_index < 0:  # an empty plan: one file with a header and no tensors
            (self.folder / self.names[0]).write_bytes(self._header([]))
        files = [self.folder / n for n in self.names]
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            path = self.folder / f"{self.stem}.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2))
            files.append(path)
        return files
