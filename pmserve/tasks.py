"""Task sequences: read a folder of task folders (jsonl, csv or parquet) or build a built-in sequence.

A task is a named pair of train and test splits of (input, label) examples. Inputs are strings (text),
image file paths / arrays (images), or conversations whose label is the response a decoder should write
(generative). Everything is validated here, before a run writes anything, so a bad file is reported by name
and nothing is left half-written.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import PMError

SUFFIXES = (".jsonl", ".csv", ".parquet")
KINDS = ("text", "image", "generative")
ROLES = ("system", "user", "assistant")


@dataclass
class Split:
    # str for text; str path or np.ndarray (H, W[, C]) uint8 for images; for generative, the conversation before
    # the response: a list of {"role", "content"} messages (a `prompt` row is one user message), so a learner
    # renders every example one way, with the model's chat template when it has one
    inputs: list
    labels: list[str]  # the class; for generative, the response (the tokens the loss is on)


@dataclass
class Task:
    name: str
    kind: str  # one of KINDS
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
    if "messages" in cols or "prompt" in cols:
        return _generative_split(path, rows, cols), "generative"
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


def _generative_split(path: Path, rows: list[dict], cols: set[str]) -> Split:
    """`prompt` and `response` columns, or a `messages` column of chat messages whose last, the assistant's, is
    the response (a JSON string in csv files)."""
    if "messages" not in cols and "response" not in cols:
        raise PMError(
            f"{path}: a 'prompt' column needs a 'response' column (columns: {', '.join(sorted(cols))})"
        )
    inputs, labels = [], []
    for n, r in enumerate(rows, 1):
        if "messages" in cols:
            msgs = _messages(path, n, r.get("messages"))
            inputs.append(msgs[:-1])
            labels.append(msgs[-1]["content"])
            continue
        x, y = r.get("prompt"), r.get("response")
        if not isinstance(x, str) or not isinstance(y, str) or not x.strip() or not y.strip():
            raise PMError(f"{path}: row {n} has an empty or non-text 'prompt' or 'response'")
        inputs.append([{"role": "user", "content": x}])
        labels.append(y)
    return Split(inputs, labels)


def _messages(path: Path, n: int, msgs) -> list[dict]:
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise PMError(f"{path}: row {n}: 'messages' is not a JSON list of messages") from None
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise PMError(f"{path}: row {n}: 'messages' must list at least a user message and the response")
    out = []
    for m in msgs:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES or not isinstance(content, str):
            raise PMError(
                f"{path}: row {n}: each message needs a role ({', '.join(ROLES)}) and a text content, got {m!r}"[
                    :300
                ]
            )
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise PMError(
            f"{path}: row {n}: the last message must be the assistant's, non-empty: it is the response"
        )
    return out


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
    """`folder/{name}.jsonl` in the format load_task_folder reads; images are copied beside it (name/NNNN.png);
    generative examples are written as `messages`, the response last."""
    folder = Path(folder)
    rows = []
    for k, (x, y) in enumerate(zip(split.inputs, split.labels)):
        if kind == "generative":
            rows.append(json.dumps({"messages": [*x, {"role": "assistant", "content": y}]}))
            continue
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
    """One kind of task (`kind`: that of the tasks they follow), and no test label that no training saw (for
    classification; a generative test response is free text)."""
    kinds = {t.kind for t in tasks}
    if len(kinds) > 1:
        raise PMError(f"tasks mix kinds ({', '.join(sorted(kinds))}); one RUN holds one kind of task")
    if kind is not None and kinds != {kind}:
        t = next(t for t in tasks if t.kind != kind)
        raise PMError(f"task {t.name}: holds {t.kind} examples, but the RUN's tasks are {kind}")
    from .rejection import OUT_OF_SCOPE

    seen = set(seen)
    for t in tasks:
        if t.kind == "generative":
            continue
        if OUT_OF_SCOPE in t.train.labels:
            raise PMError(f"task {t.name}: the label {OUT_OF_SCOPE!r} is reserved for out-of-scope answers")
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


def _options(spec: str, params: dict[str, int], defaults: dict[str, int]) -> tuple[int, int, int, int]:
    """(tasks, classes, train, test) of a built-in spec: its options over the built-in's defaults."""
    p = {**defaults, **params}
    unknown = set(params) - set(defaults)
    if unknown:
        raise PMError(
            f"{spec}: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(defaults)})"
        )
    n_tasks, per_task, n_train, n_test = p["tasks"], p["classes"], p["train"], p["test"]
    if min(n_tasks, per_task, n_train, n_test) < 1:
        raise PMError(f"{spec}: tasks, classes, train and test must be positive")
    return n_tasks, per_task, n_train, n_test


def _class_incremental(
    spec: str,
    examples: dict[str, list],
    kind: str,
    params: dict[str, int],
    defaults: dict[str, int],
    seed: int,
) -> list[Task]:
    n_tasks, per_task, n_train, n_test = _options(spec, params, defaults)
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


def _pooled(loader, kind: str):
    """The builder of a built-in whose classes are drawn from one pool of examples each (_class_incremental)."""

    def build(spec: str, params: dict[str, int], defaults: dict[str, int], seed: int) -> list[Task]:
        return _class_incremental(spec, loader(), kind, params, defaults, seed)

    return build


# ---------------------------------------------------------------- CLINC150

# Per-intent requests a default builtin:clinc150 draws: 10 tasks x 15 intents x 10 = 1,500 training requests of
# CLINC150's 15,000, and all 30 test requests: a default `pmserve train builtin:clinc150` ran in 22 s a task on
# the shared 2-core VM at load 3, 21.8 min in all at load 6 to 9, ACC 0.892 (BENCHMARKS.md, issue 36).
CLINC150_TRAIN, CLINC150_TEST = 10, 30
CLINC150_SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test")


class IntentRecord(NamedTuple):
    """One CLINC150 request: its text, its intent ("oos" when out of scope) and its intent's domain (None when
    out of scope)."""

    text: str
    intent: str
    domain: str | None


@functools.lru_cache(maxsize=1)
def _clinc150_data() -> dict:
    ref = resources.files("pmserve.data") / "clinc150.json.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return json.load(f)


def clinc150_domains() -> dict[str, list[str]]:
    """CLINC150's 10 domains, each with its 15 intents, in the order the source repository lists them."""
    return {d: list(intents) for d, intents in _clinc150_data()["domains"].items()}


def clinc150_records(split: str) -> list[IntentRecord]:
    """CLINC150's requests of one split, as shipped (pmserve/data/LICENSE-clinc150): `train`, `val`, `test`
    (in scope: 100 / 20 / 30 per intent, intents sorted, requests in source order) or `oos_train`, `oos_val`,
    `oos_test` (out of scope: 100 / 100 / 1000). The raw records every CLINC150 built-in is drawn from."""
    if split not in CLINC150_SPLITS:
        raise ValueError(f"CLINC150 split {split!r}: one of {', '.join(CLINC150_SPLITS)}")
    data = _clinc150_data()
    if split.startswith("oos_"):
        return [IntentRecord(t, "oos", None) for t in data["oos"][split[len("oos_") :]]]
    domain_of = {i: d for d, intents in data["domains"].items() for i in intents}
    return [IntentRecord(t, i, domain_of[i]) for i, texts in data[split].items() for t in texts]


def _clinc150_tasks(spec: str, params: dict[str, int], defaults: dict[str, int], seed: int) -> list[Task]:
    """In-scope intents, grouped by domain: the domains in an order drawn by the seed, each domain's intents in
    an order drawn by the seed, then cut into tasks of `classes` intents (the default 10 x 15: one domain per
    task). Each intent's `train` requests are drawn from its 100 training requests and its `test` from its 30
    test requests by a generator of (seed, intent) alone, so an intent holds the same requests however the
    intents are grouped, and a smaller count is a prefix of a larger one. The validation split is not used."""
    n_tasks, per_task, n_train, n_test = _options(spec, params, defaults)
    domains = clinc150_domains()
    n_intents = sum(map(len, domains.values()))
    if n_tasks * per_task > n_intents:
        raise PMError(
            f"{spec}: {n_tasks} tasks x {per_task} intents needs {n_tasks * per_task}; CLINC150 has {n_intents}"
        )
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for split, by_intent in by_split.items():
        for r in clinc150_records(split):
            by_intent.setdefault(r.intent, []).append(r.text)
    have = {s: min(map(len, v.values())) for s, v in by_split.items()}
    if n_train > have["train"] or n_test > have["test"]:
        raise PMError(
            f"{spec}: CLINC150 has {have['train']} train and {have['test']} test requests per intent "
            f"(asked for train={n_train}, test={n_test})"
        )
    rng = random.Random(seed)
    order = [
        (i, d)
        for d in rng.sample(list(domains), len(domains))
        for i in rng.sample(domains[d], len(domains[d]))
    ]
    chunks = [order[t * per_task : (t + 1) * per_task] for t in range(n_tasks)]
    # a task is named for its domains; a domain cut into several tasks numbers them (banking.1, banking.2, ...)
    names = ["+".join(dict.fromkeys(d for _, d in chunk)) for chunk in chunks]
    seen: dict[str, int] = {}
    tasks = []
    for chunk, name in zip(chunks, names):
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}.{seen[name]}"
        tr, te = Split([], []), Split([], [])
        for intent, _ in chunk:
            draw = random.Random(f"clinc150:{seed}:{intent}")
            tr.inputs += draw.sample(by_split["train"][intent], have["train"])[:n_train]
            te.inputs += draw.sample(by_split["test"][intent], have["test"])[:n_test]
            tr.labels += [intent] * n_train
            te.labels += [intent] * n_test
        tasks.append(Task(name, "text", tr, te, [i for i, _ in chunk]))
    return tasks


# builtin:clinc150-gen: CLINC150 as instruction tasks for a decoder. Fewer requests per intent than
# builtin:clinc150 by default: each test request is answered by generating, which on a CPU costs far more than
# one encoder pass.
CLINC150_GEN_TRAIN, CLINC150_GEN_TEST = 10, 5
CLINC150_GEN_INSTRUCTION = "Which intent is this request? Answer with the intent name."


def intent_response(intent: str) -> str:
    """The response for a CLINC150 intent: its name with spaces for underscores ("change accent"), the words a
    language model writes rather than an identifier it must spell token by token; no intent name holds a space,
    so the response maps back to one intent."""
    return intent.replace("_", " ")


def clinc150_prompt(text: str, choices: list[str] | None = None) -> str:
    """The instruction and the request; with `choices` (task-incremental), the names to answer from too."""
    head = CLINC150_GEN_INSTRUCTION
    if choices:
        head += " One of: " + ", ".join(choices) + "."
    return f"{head}\nRequest: {text}"


def _clinc150_gen_tasks(spec: str, params: dict[str, int], defaults: dict[str, int], seed: int) -> list[Task]:
    """builtin:clinc150's tasks (the same domains, intents and requests for the same seed and options) as
    generative tasks: the request in (clinc150_prompt), the intent's name out (intent_response).
    Class-incremental by default: the prompt lists no candidate names, so the model must recall every intent it
    has learnt; `list_intents=1` lists the current task's intents in the prompt (task-incremental)."""
    list_intents = {**defaults, **params}["list_intents"]
    if list_intents not in (0, 1):
        raise PMError(f"{spec}: list_intents must be 0 or 1")
    out = []
    for t in _clinc150_tasks(spec, params, defaults, seed):
        names = [intent_response(c) for c in t.classes]
        choices = sorted(names) if list_intents else None

        def gen(split: Split, choices=choices) -> Split:
            prompts = [[{"role": "user", "content": clinc150_prompt(x, choices)}] for x in split.inputs]
            return Split(prompts, [intent_response(y) for y in split.labels])

        out.append(Task(t.name, "generative", gen(t.train), gen(t.test), names))
    return out


BUILTINS = {
    # name: (build(spec, params, defaults, seed) -> tasks, defaults)
    "wordnet-nouns": (
        _pooled(lambda: _wordnet_examples("nouns"), "text"),
        {"tasks": 5, "classes": 4, "train": 120, "test": 60},
    ),
    "wordnet-verbs": (
        _pooled(lambda: _wordnet_examples("verbs"), "text"),
        {"tasks": 3, "classes": 4, "train": 120, "test": 60},
    ),
    "digits": (_pooled(_digit_examples, "image"), {"tasks": 5, "classes": 2, "train": 120, "test": 50}),
    "clinc150": (
        _clinc150_tasks,
        {"tasks": 10, "classes": 15, "train": CLINC150_TRAIN, "test": CLINC150_TEST},
    ),
    "clinc150-gen": (
        _clinc150_gen_tasks,
        {
            "tasks": 10,
            "classes": 15,
            "train": CLINC150_GEN_TRAIN,
            "test": CLINC150_GEN_TEST,
            "list_intents": 0,
        },
    ),
}


def builtin_tasks(spec: str, seed: int = 0) -> list[Task]:
    name, params = _parse_builtin(spec)
    if name not in BUILTINS:
        raise PMError(f"{spec}: unknown built-in data (known: {', '.join(BUILTINS)})")
    build, defaults = BUILTINS[name]
    return build(spec, params, defaults, seed)
