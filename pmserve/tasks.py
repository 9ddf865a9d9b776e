"""Task sequences: read a folder of task folders (jsonl, csv or parquet) or build a built-in sequence.

A task is a named pair of train and test splits of (input, label) examples. Inputs are strings (text) or
image file paths / arrays (images). Everything is validated here, before a run writes anything, so a bad
file is reported by name and nothing is left half-written.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import PMError

SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class Split:
    inputs: list  # str for text; str path or np.ndarray (H, W[, C]) uint8 for images
    labels: list[str]


@dataclass
class Task:
    name: str
    kind: str  # "text" or "image"
    train: Split
    test: Split
    classes: list[str] = field(default_factory=list)  # labels of the train split, first-seen order


# ---------------------------------------------------------------- files


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise PMError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            return rows
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except PMError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PMError(f"{path}: cannot read ({e})") from None


def _read_split(folder: Path, split: str) -> tuple[Split, str]:
    files = [folder / f"{split}{s}" for s in SUFFIXES if (folder / f"{split}{s}").is_file()]
    if not files:
        raise PMError(f"{folder}: no {split}.jsonl, {split}.csv or {split}.parquet")
    if len(files) > 1:
        raise PMError(f"{folder}: several {split} files ({', '.join(f.name for f in files)}); keep one")
    path = files[0]
    rows = _read_rows(path)
    if not rows:
        raise PMError(f"{path}: no examples")
    cols = set(rows[0])
    if "label" not in cols:
        raise PMError(f"{path}: no 'label' column (columns: {', '.join(sorted(cols)) or 'none'})")
    if "text" in cols:
        kind, col = "text", "text"
    elif "image" in cols:
        kind, col = "image", "image"
    else:
        raise PMError(f"{path}: no 'text' or 'image' column (columns: {', '.join(sorted(cols))})")
    inputs, labels = [], []
    for n, r in enumerate(rows, 1):
        x, y = r.get(col), r.get("label")
        if x is None or y is None or (isinstance(y, str) and not y.strip()):
            raise PMError(f"{path}: row {n} has an empty '{col}' or 'label'")
        if kind == "image":
            p = (path.parent / str(x)).resolve()
            if not p.is_file():
                raise PMError(f"{path}: row {n}: image file {p} does not exist")
            x = str(p)
        inputs.append(str(x) if kind == "text" else x)
        labels.append(str(y))
    return Split(inputs, labels), kind


def _first_seen(labels: list[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def load_task_folder(folder: Path) -> Task:
    if not folder.is_dir():
        raise PMError(f"{folder}: task folder does not exist")
    train, kind = _read_split(folder, "train")
    test, kind_test = _read_split(folder, "test")
    if kind != kind_test:
        raise PMError(f"{folder}: train is {kind} but test is {kind_test}")
    return Task(folder.name, kind, train, test, _first_seen(train.labels))


def is_task_folder(folder: Path) -> bool:
    return any((Path(folder) / f"train{s}").is_file() for s in SUFFIXES)


def task_folders(root: Path) -> list[Path]:
    """A DATA folder's task folders, sorted by name (hidden ones skipped)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def task_hash(task: Task) -> str:
    """The sha256 of a task's examples (train, then test; image files by their bytes): what identifies a task
    in a RUN, whatever its folder is called or wherever it lies."""
    h = hashlib.sha256()
    for split in (task.train, task.test):
        h.update(b"\x00split")
        for x, y in zip(split.inputs, split.labels):
            if isinstance(x, np.ndarray):
                h.update(f"array{x.shape}{x.dtype}".encode() + x.tobytes())
            elif task.kind == "image":
                h.update(b"file" + Path(x).read_bytes())
            else:
                h.update(b"text" + json.dumps(x).encode())
            h.update(b"label" + json.dumps(y).encode())
    return h.hexdigest()


def save_split(split: Split, kind: str, folder: Path, name: str = "test") -> None:
    """`folder/{name}.jsonl` in the format load_task_folder reads; images are copied beside it (name/NNNN.png)."""
    folder = Path(folder)
    rows = []
    for k, (x, y) in enumerate(zip(split.inputs, split.labels)):
        if kind == "image":
            (folder / name).mkdir(exist_ok=True)
            if isinstance(x, np.ndarray):
                from PIL import Image

                rel = f"{name}/{k:05d}.png"
                Image.fromarray(x).save(folder / rel)
            else:
                rel = f"{name}/{k:05d}{Path(x).suffix}"
                shutil.copyfile(x, folder / rel)
            x = rel
        rows.append(json.dumps({kind: x, "label": y}))
    (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def load_split(folder: Path, name: str = "test") -> Split:
    return _read_split(Path(folder), name)[0]


def load_tasks(spec: str, seed: int = 0) -> list[Task]:
    """Tasks in order from a folder of task folders (sorted by name) or from `builtin:NAME[:k=v,...]`."""
    if spec.startswith("builtin:"):
        tasks = builtin_tasks(spec, seed)
    else:
        root = Path(spec)
        if not root.is_dir():
            raise PMError(f"{spec}: data folder does not exist")
        subs = task_folders(root)
        if not subs:
            raise PMError(f"{spec}: no task folders inside (expected one subfolder per task)")
        tasks = [load_task_folder(p) for p in subs]
    check_tasks(tasks)
    return tasks


def check_tasks(tasks: list[Task], kind: str | None = None, seen: list[str] = ()) -> None:
    """One input kind (`kind`: that of the tasks they follow), and no test label that no training saw."""
    kinds = {t.kind for t in tasks}
    if len(kinds) > 1:
        raise PMError(f"tasks mix text and images ({', '.join(sorted(kinds))})")
    if kind is not None and kinds != {kind}:
        t = next(t for t in tasks if t.kind != kind)
        raise PMError(f"task {t.name}: holds {t.kind} examples, but the RUN's tasks are {kind}")
    seen = set(seen)
    for t in tasks:
        seen.update(t.train.labels)
        unseen = sorted(set(t.test.labels) - seen)
        if unseen:
            raise PMError(f"task {t.name}: test label(s) never seen in training: {', '.join(unseen[:5])}")


# ---------------------------------------------------------------- built-in sequences


def _parse_builtin(spec: str) -> tuple[str, dict[str, int]]:
    body = spec[len("builtin:") :]
    name, _, opts = body.partition(":")
    params: dict[str, int] = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        try:
            params[k.strip()] = int(v)
        except ValueError:
            raise PMError(f"{spec}: option {item!r} must be key=integer") from None
    return name, params


def _class_incremental(
    spec: str,
    examples: dict[str, list],
    kind: str,
    params: dict[str, int],
    defaults: dict[str, int],
    seed: int,
) -> list[Task]:
    p = {**defaults, **params}
    unknown = set(params) - set(defaults)
    if unknown:
        raise PMError(
            f"{spec}: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(defaults)})"
        )
    n_tasks, per_task, n_train, n_test = p["tasks"], p["classes"], p["train"], p["test"]
    if min(n_tasks, per_task, n_train, n_test) < 1:
        raise PMError(f"{spec}: tasks, classes, train and test must be positive")
    usable = sorted(c for c, xs in examples.items() if len(xs) >= n_train + n_test)
    if n_tasks * per_task > len(usable):
        raise PMError(
            f"{spec}: {n_tasks} tasks x {per_task} classes needs {n_tasks * per_task} classes with "
            f"{n_train + n_test} examples each; only {len(usable)} have that many"
        )
    rng = random.Random(seed)
    order = rng.sample(usable, n_tasks * per_task)  # the class order is fixed by the seed
    tasks = []
    for t in range(n_tasks):
        classes = order[t * per_task : (t + 1) * per_task]
        tr, te = Split([], []), Split([], [])
        for c in classes:
            picked = rng.sample(examples[c], n_train + n_test)
            tr.inputs += picked[:n_train]
            tr.labels += [c] * n_train
            te.inputs += picked[n_train:]
            te.labels += [c] * n_test
        tasks.append(Task(f"task{t}", kind, tr, te, classes))
    return tasks


def _wordnet_examples(part: str) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = {}
    ref = resources.files("pmserve.data") / f"wordnet_{part}.jsonl.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            by_label.setdefault(r["label"], []).append(r["text"])
    return by_label


def _digit_examples() -> dict[str, list[np.ndarray]]:
    with (resources.files("pmserve.data") / "digits.npz").open("rb") as f:
        z = np.load(f)
        images, labels = z["images"], z["labels"]
    by_label: dict[str, list[np.ndarray]] = {}
    for img, y in zip(images, labels):
        by_label.setdefault(str(int(y)), []).append(img)
    return by_label


BUILTINS = {
    # name: (loader, kind, defaults)
    "wordnet-nouns": (
        lambda: _wordnet_examples("nouns"),
        "text",
        {"tasks": 5, "classes": 4, "train": 120, "test": 60},
    ),
    "wordnet-verbs": (
        lambda: _wordnet_examples("verbs"),
        "text",
        {"tasks": 3, "classes": 4, "train": 120, "test": 60},
    ),
    "digits": (_digit_examples, "image", {"tasks": 5, "classes": 2, "train": 120, "test": 50}),
}


def builtin_tasks(spec: str, seed: int = 0) -> list[Task]:
    name, params = _parse_builtin(spec)
    if name not in BUILTINS:
        raise PMError(f"{spec}: unknown built-in data (known: {', '.join(BUILTINS)})")
    loader, kind, defaults = BUILTINS[name]
    return _class_incremental(spec, loader(), kind, params, defaults, seed)
