"""Model cards (README.md) for what pmserve writes: a RUN's task folders and `pmserve merge` outputs.

PEFT's save_pretrained leaves a template card full of "[More Information Needed]"; these say what the folder is,
what it was trained or merged from, how well it did, and how to load it. Plain functions from the JSON records
pmserve already writes (task.json, config.json, merge_report.json) to Markdown with Hugging Face front matter;
no torch, no file access.
"""

from __future__ import annotations

import json
import posixpath

TAGS = ("pmserve", "lora", "continual-learning")
PAPER = "Perturb-and-Merge, [arXiv 2505.22389](https://arxiv.org/abs/2505.22389)"

# Hugging Face Hub ids of the built-in models (what the front matter's base_model names)
HUB_IDS = {"builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2"}

METHODS = {
    "pm": "Perturb-and-Merge: perturbed LoRA training, closed-form Fisher-weighted merge",
    "merge": "closed-form Fisher-weighted merge, no perturbation",
    "seq": "sequential LoRA (alpha = 1)",
    "avg": "running average of the task vectors (alpha_t = 1/t)",
    "frozen": "no LoRA: classifiers on the frozen backbone",
    "joint": "one LoRA trained on all tasks at once (an upper bound, not a continual method)",
    "linear": "weighted average of the task vectors",
    "task-arithmetic": "weighted sum of the task vectors",
    "ties": "TIES: trim, elect sign, disjoint merge",
    "dare-linear": "DARE random pruning, then a weighted sum",
    "dare-ties": "DARE random pruning, then TIES",
}


def _q(value) -> str:
    """A YAML scalar: a JSON string is a valid double-quoted YAML string."""
    return json.dumps(value) if isinstance(value, str) else str(value)


def front_matter(library_name: str, base_model: str | None, extra: dict | None = None) -> str:
    lines = ["---", f"library_name: {library_name}"]
    if base_model:
        lines.append(f"base_model: {_q(HUB_IDS.get(base_model, base_model))}")
    lines.append("tags:")
    lines += [f"- {t}" for t in TAGS]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {_q(v)}")
    lines.append("---")
    return "\n".join(lines)


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _code(text) -> str:
    return f"`{text}`"


def _labels(labels: list[str]) -> str:
    return ", ".join(_code(y) for y in labels) if labels else "-"


def _base_line(spec: str | None, path: str | None) -> str:
    if not spec and not path:
        return "-"
    parts = [_code(spec or path)]
    if spec in HUB_IDS:
        parts.append(f"({HUB_IDS[spec]} on the Hugging Face Hub)")
    if path and path != spec:
        parts.append(f"at {_code(path)}")
    return " ".join(parts)


def _loadable(spec: str | None, path: str | None) -> str:
    """What AutoModel.from_pretrained can take for the base: its folder, else a built-in's Hub id."""
    return path or HUB_IDS.get(spec or "") or spec or "BASE"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def task_card(
    task: dict,
    config: dict,
    tasks: list[str],
    *,
    base_path: str | None = None,
    folder: str | None = None,
) -> str:
    """README.md of a RUN's task folder `tasks/NN-NAME/`.

    task: the folder's task.json (index, name, method, labels, alpha, acc: {head: [accuracy on each task so
    far]}, ridge_lambda, seconds). config: the RUN's config.json (TrainConfig as a dict: model, data, head,
    rank, lora_alpha, target_modules, eps, seed, ...). tasks: the names of all the run's tasks in order (task
    i's folder is tasks/{i:02d}-{name}, as pmserve.train names them). base_path: the base model's local folder
    (what adapter_config.json names) when config["model"] is not one, e.g. for builtin:minilm. folder: this
    folder's path as users should type it in the loading code (default RUN/tasks/NN-NAME).

    For a folder with an adapter (every method but frozen). A joint run has one folder, task 0, whose
    accuracies cover every task: pass all the task names."""
    i = int(task.get("index", 0))
    name = task.get("name", f"task{i}")
    method = task.get("method") or config.get("method", "pm")
    model = config.get("model")
    n = len(tasks)
    joint = method == "joint"
    here = folder or f"RUN/tasks/{i:02d}-{name}"
    task_folders = posixpath.dirname(here.rstrip("/"))
    prev = f"{i - 1:02d}-{tasks[i - 1]}" if 0 < i <= len(tasks) and not joint else None
    prev_out = f"after-task{i - 1}"  # where the card's merge command rebuilds W_hat_{i-1} - W_0
    prev_merged = posixpath.join(prev_out, "merged.safetensors")
    prefix = " ".join(posixpath.join(task_folders, f"{k:02d}-{tasks[k]}") for k in range(i)) if prev else ""
    base = _loadable(model, base_path)
    lora_alpha = config.get("lora_alpha") or config.get("rank")
    modules = config.get("target_modules") or []

    out = [front_matter("peft", model), ""]
    if joint:
        out.append(f"# pmserve: LoRA adapter trained on all {n} tasks at once (joint)")
    else:
        out.append(f"# pmserve: LoRA adapter of task {i} ({name}), the {_ordinal(i + 1)} of {n}")
    out.append("")
    if joint:
        out.append(
            f"The LoRA adapter of a pmserve `joint` run ({METHODS['joint']}), trained on every task's data at "
            f"once: what the continual methods ({PAPER}) are measured against."
        )
    else:
        out.append(
            f"One task's LoRA adapter from a pmserve continual fine-tuning run (method `{method}`: "
            f"{METHODS.get(method, method)}; {PAPER}). Each task trains a LoRA on the model merged from the "
            "tasks before it; after the task the LoRA is merged into that model with coefficient alpha."
        )
    out.append("")
    rows = [
        ("base model", _base_line(model, base_path)),
        (
            "task",
            f"all at once: {', '.join(_code(t) for t in tasks)}"
            if joint
            else f"{i} ({_code(name)}), the {_ordinal(i + 1)} of {n}: {', '.join(_code(t) for t in tasks)}",
        ),
        ("data", _code(config["data"]) if config.get("data") else "-"),
        ("labels", _labels(task.get("labels") or [])),
        ("method", _code(method)),
        ("alpha", f"{_num(task.get('alpha'))} (this task's weight in the merged model)"),
        (
            "LoRA",
            f"rank {config.get('rank', '-')}, alpha {_num(lora_alpha)}, modules {', '.join(modules) or '-'}",
        ),
        ("inference head", _code(config.get("head", "linear"))),
        ("seed", str(config.get("seed", "-"))),
    ]
    if method == "pm":
        rows.insert(
            5, ("perturbation", f"eps {_num(config.get('eps'))}, per {config.get('perturb_per', 'step')}")
        )
    scaled = task.get("curvature")
    if scaled:  # --curvature profile: how this task's Fisher was scaled before alpha weighed it
        losses = ", ".join(f"L({_num(s)}) {_num(x, 4)}" for s, x in zip(scaled["points"], scaled["losses"]))
        rows.append(
            (
                "curvature",
                f"profile {losses}: c {_num(scaled['curvature'], 4)}, Fisher x {scaled['fisher_scale']:.3g}",
            )
        )
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out.append("")

    acc = task.get("acc") or {}
    if acc:
        seen = tasks[: max(len(v) for v in acc.values())]
        out.append(f"## Accuracy after task {i}")
        out.append("")
        out.append(
            "Test accuracy of the merged model after this task, on every task so far, per inference head:"
        )
        out.append("")
        out.append("| head | " + " | ".join(seen) + " | mean |")
        out.append("|---" * (len(seen) + 2) + "|")
        head = config.get("head")
        for h in sorted(acc, key=lambda h: (h != head, h)):
            vals = acc[h]
            measured = [a for a in vals if a is not None]  # None: that test set was not reachable
            mean = sum(measured) / len(measured) if measured else None
            label = f"{h} (the run's head)" if h == head else h
            out.append(f"| {label} | " + " | ".join(_num(a, 3) for a in vals) + f" | {_num(mean, 3)} |")
        out.append("")

    out.append("## Files")
    out.append("")
    out.append("- `adapter_model.safetensors`, `adapter_config.json`: the LoRA in PEFT's format")
    out.append("- `pmserve_adapter.json`: kind `chained`, base model and its fingerprint, labels")
    out.append("- `task.json`: alpha, accuracies, labels, the data's sha256, seconds")
    out.append("- `test.jsonl`: the task's test split, which later tasks evaluate on (unless --no-keep-test)")
    out.append(
        "- `fisher.safetensors`: the diagonal Fisher of this task as alpha weighed it, scaled to its loss profile "
        "unless --curvature fisher (only with --keep-fisher)"
    )
    out.append(
        "- the RUN's `state/` holds the merged model after its last task (`merged.safetensors`, W_hat - W_0) "
        "and its classifiers, once"
    )
    out.append("")
    out.append("## How to load it")
    out.append("")
    if prev is None:
        out.append(
            ("This is the joint run's only adapter" if joint else "This is the first task")
            + ": the LoRA was trained on the base model itself, so PEFT loads it as usual:"
        )
        out.append("")
        out.append("```python")
        out.append("from peft import PeftModel")
        out.append("from transformers import AutoModel")
        out.append("")
        out.append(f"BASE = {_q(base)}")
        out.append(f"FOLDER = {_q(here)}")
        out.append("model = PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), FOLDER)")
        out.append("```")
    else:
        out.append(
            f"This adapter is **chained**: it was trained on the merged model after task {i - 1}, not on the base "
            "model, so `PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), FOLDER)` alone gives a model "
            "that never existed. Rebuild the merged weights after the previous task first (W_hat - W_0 by module "
            "name, from the RUN's adapters and recorded alphas):"
        )
        out.append("")
        out.append(f"    pmserve merge {prefix} --format delta --out {prev_out}")
        out.append("")
        out.append("then load them, and the adapter:")
        out.append("")
        out.append("```python")
        out.append("import torch")
        out.append("from peft import PeftModel")
        out.append("from safetensors.torch import load_file")
        out.append("from transformers import AutoModel")
        out.append("")
        out.append(f"BASE = {_q(base)}")
        out.append(f"FOLDER = {_q(here)}")
        out.append("model = AutoModel.from_pretrained(BASE)")
        out.append("modules = dict(model.named_modules())")
        out.append("with torch.no_grad():  # W_0 + (W_hat_{t-1} - W_0)")
        out.append(f"    for name, d in load_file({_q(prev_merged)}).items():")
        out.append("        modules[name].weight += d.to(modules[name].weight.dtype)")
        out.append("model = PeftModel.from_pretrained(model, FOLDER)")
        out.append("```")
    out.append("")
    out.append(
        "To use the model merged from every task up to this one, merge this folder with the ones before it "
        "(`--format delta`, added to the base model the same way, no adapter; for the RUN's last task that is "
        "its `state/merged.safetensors`), or let pmserve build it: `pmserve merge RUN --out merged --format full` "
        "(a plain Hugging Face model folder), `pmserve export RUN --out bundle` (ONNX with the classifier), "
        "`pmserve predict bundle TEXT`."
    )
    out.append("")
    return "\n".join(out)


def merged_card(report: dict, *, folder: str | None = None) -> str:
    """README.md of a `pmserve merge` output folder, from its merge_report.json (`report`).

    Uses method, format, base {model, path}, inputs [{path, name, task}], labels, alphas, weights,
    coefficients, fisher, clip, density, seed, classifier, notes and outputs, each where present. folder: the
    output folder as users should type it in the loading code (default OUT)."""
    method = report.get("method", "?")
    fmt = report.get("format", "delta")
    base = report.get("base") or {}
    spec, path = base.get("model"), base.get("path")
    inputs = report.get("inputs") or []
    here = folder or "OUT"
    load_base = _loadable(spec, path)

    out = [front_matter("peft" if fmt == "adapter" else "transformers", spec), ""]
    out.append(f"# pmserve: {len(inputs)} LoRA adapters merged with {method} ({fmt})")
    out.append("")
    out.append(
        f"Written by `pmserve merge` from the adapters' files alone: method `{method}` "
        f"({METHODS.get(method, method)}), output format `{fmt}`."
    )
    out.append("")
    rows = [("base model", _base_line(spec, path)), ("method", _code(method)), ("format", _code(fmt))]
    if report.get("fisher"):
        rows.append(("Fisher", f"from {report['fisher']}"))
    if report.get("clip") is not None:
        rows.append(("alphas clipped to [0, 1]", "yes" if report["clip"] else "no"))
    if report.get("density") is not None:
        rows.append(("density", _num(report["density"])))
    if report.get("seed") is not None:
        rows.append(("seed", str(report["seed"])))
    rows.append(("labels", _labels(report.get("labels") or [])))
    clf = report.get("classifier") or {}
    if clf.get("kind") or clf.get("note"):
        desc = _code(clf["kind"]) if clf.get("kind") else "none"
        if clf.get("note"):
            desc += f": {clf['note']}"
        rows.append(("inference classifier", desc))
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out.append("")

    out.append("## Inputs")
    out.append("")
    alphas, weights, coefs = report.get("alphas"), report.get("weights"), report.get("coefficients")
    cols = ["#", "adapter", "task"]
    for label, vals in (("alpha", alphas), ("weight", weights), ("coefficient", coefs)):
        if vals is not None:
            cols.append(label)
    out.append("| " + " | ".join(cols) + " |")
    out.append("|---" * len(cols) + "|")
    for k, a in enumerate(inputs):
        row = [
            str(k),
            _code(a.get("path") or a.get("name", "?")),
            "-" if a.get("task") is None else str(a["task"]),
        ]
        for vals in (alphas, weights, coefs):
            if vals is not None:
                row.append(_num(vals[k]) if k < len(vals) else "-")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    if coefs is not None:
        out.append("The merged weights are W_hat = W_0 + sum_t c_t Delta_t with the coefficients c_t above.")
        out.append("")

    out.append("## How to load it")
    out.append("")
    out.append("```python")
    # merged PEFT modules_to_save (a SEQ_CLS head): the model to load is the classifier that holds them
    auto = (
        "AutoModelForSequenceClassification"
        if (report.get("saved_modules") or {}).get("tensors")
        else "AutoModel"
    )
    if fmt == "full":
        out.append(f"from transformers import {auto}")
        out.append("")
        out.append(f"model = {auto}.from_pretrained({_q(here)})")
    elif fmt == "adapter":
        out.append("from peft import PeftModel")
        out.append(f"from transformers import {auto}")
        out.append("")
        out.append(f"BASE = {_q(load_base)}")
        out.append(f"model = PeftModel.from_pretrained({auto}.from_pretrained(BASE), {_q(here)})")
        out.append(
            "model = model.merge_and_unload()  # optional: one plain model, no LoRA branch at inference"
        )
    else:
        out.append("import torch")
        out.append("from safetensors.torch import load_file")
        out.append(f"from transformers import {auto}")
        out.append("")
        out.append(f"BASE = {_q(load_base)}")
        out.append(f"model = {auto}.from_pretrained(BASE)")
        out.append("modules = dict(model.named_modules())")
        out.append("with torch.no_grad():  # W_hat = W_0 + merged.safetensors, by module name")
        out.append(f"    for name, d in load_file({_q(posixpath.join(here, 'merged.safetensors'))}).items():")
        out.append("        modules[name].weight += d.to(modules[name].weight.dtype)")
        if auto != "AutoModel":
            out.append("    params = dict(model.named_parameters())  # the merged head replaces the base's")
            out.append(
                f"    for name, t in load_file({_q(posixpath.join(here, 'modules_to_save.safetensors'))}).items():"
            )
            out.append("        params[name].copy_(t)")
    out.append("```")
    out.append("")
    if fmt == "delta":
        out.append(
            "`merged.safetensors` holds W_hat - W_0 of every adapted matrix (fp32), keyed by the module's name "
            "in the base model; the base model's other weights are unchanged."
        )
        out.append("")
    if fmt == "full":
        out.append(f"`pmserve export {here} --out bundle` makes an ONNX bundle with the classifier inside.")
    else:
        out.append(
            "For an ONNX bundle with the classifier inside, merge with `--format full` and `pmserve export` it."
        )
    out.append("")
    notes = report.get("notes") or []
    if notes:
        out.append("## Notes")
        out.append("")
        out += [f"- {n}" for n in notes]
        out.append("")
    outputs = report.get("outputs") or []
    if outputs:
        out.append("## Files")
        out.append("")
        out += [f"- `{f}`" for f in outputs]
        out.append("- `merge_report.json`: everything above and the inputs' checksums")
        out.append("")
    return "\n".join(out)
