"""The writers of `pmserve merge`: a plan and its inputs -> OUT, in one of three formats, with a report.

- delta: merged.safetensors, W_hat - W_0 of every adapted module (fp32), named as a RUN's merged.safetensors;
  the merged PEFT modules_to_save (a SEQ_CLS head), whole, in modules_to_save.safetensors;
- adapter: one PEFT LoRA of rank sum r_t that reproduces pm / avg / linear / task-arithmetic exactly
  (task LoRAs concatenated along the rank, B_t scaled by c_t), the merged modules_to_save as PEFT saves them;
- full: a Hugging Face model folder with W_hat in the base's dtypes, sharded like save_pretrained, with the
  base's tokenizer or image processor and the classifier (what `pmserve export` takes); merged modules_to_save
  are the model's own weights (the head export keeps in the graph, labels from the base's id2label).
Each writes one module at a time (formats from pmserve.formats), into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import apply_delta
from ..backbone import is_decoder
from ..errors import PMError
from ..formats import MODEL_CARD, atomic_dir, check_new_out, sha256_file, write_json
from ..formats import merged as merged_files
from ..formats import peft as peft_files
from ..formats import pooling as pooling_files
from ..formats.peft import PEFT_PREFIX, AdapterInput, read_adapter
from ..formats.run import MERGED
from ..model_card import merged_card
from ..tensor_io import SafetensorsWriter, TensorSpec, parse_size
from .base import resolve_base
from .classifier import calibration_tasks, write_classifier
from .execute import module_delta, saved_value
from .inputs import Inputs, check_inputs, expand_inputs
from .plan import MergeOptions, MergePlan, plan_merge
from .saved import saved_record


def write_delta(tmp: Path, plan: MergePlan, inp: Inputs, norms: dict) -> list[Path]:
    """merged.safetensors: W_hat - W_0 of every adapted module, fp32, named as a RUN's merged.safetensors."""
    specs = [TensorSpec(m, torch.float32, tuple(inp.base.weights.shape(inp.keys[m]))) for m in inp.modules]
    stem = MERGED.removesuffix(".safetensors")
    w = SafetensorsWriter(tmp, specs, stem=stem, metadata={"pmserve": "W_hat - W_0 per adapted module"})
    for i, m in enumerate(inp.modules):
        w.write(m, module_delta(plan, inp.adapters, i, m, norms))
    files = w.close()
    if plan.saved:  # whole tensors, by the base model's parameter name; export copies them in
        specs = [TensorSpec(s.tensor.model_key, torch.float32, s.tensor.shape) for s in plan.saved]
        stem = merged_files.SAVED.removesuffix(".safetensors")
        w = SafetensorsWriter(tmp, specs, stem=stem, metadata={"pmserve": "merged PEFT modules_to_save"})
        for s in plan.saved:
            w.write(s.tensor.model_key, saved_value(s, inp.adapters, inp.base))
        files += w.close()
    return files


def write_adapter(tmp: Path, plan: MergePlan, inp: Inputs, norms: dict) -> list[Path]:
    """One PEFT LoRA: every task's factors concatenated along the rank, B_t scaled by c_t * scaling_t, scaling 1."""
    ads = inp.adapters
    total = {m: sum(a.modules[m].rank for a in ads) for m in inp.modules}
    specs = []
    for m in inp.modules:
        (_, i), (o, _) = (
            ads[0].tensors.shapes[ads[0].modules[m].a_key],
            ads[0].tensors.shapes[ads[0].modules[m].b_key],
        )
        specs += [
            TensorSpec(f"{PEFT_PREFIX}{m}.lora_A.weight", torch.float32, (total[m], i)),
            TensorSpec(f"{PEFT_PREFIX}{m}.lora_B.weight", torch.float32, (o, total[m])),
        ]
    specs += [
        TensorSpec(peft_files.saved_file_key(s.tensor.name), torch.float32, s.tensor.shape)
        for s in plan.saved
    ]
    w = SafetensorsWriter(tmp, specs, stem=peft_files.WEIGHTS.removesuffix(".safetensors"))
    for k, m in enumerate(inp.modules):
        module_delta(
            plan, ads, k, m, norms
        )  # the norms the report records; the adapter needs only the factors
        parts = [a.factors(m) for a in ads]
        w.write(f"{PEFT_PREFIX}{m}.lora_A.weight", torch.cat([fa.float() for fa, _ in parts], dim=0))
        w.write(
            f"{PEFT_PREFIX}{m}.lora_B.weight",
            torch.cat(
                [
                    c * a.modules[m].scaling * fb.float()
                    for c, a, (_, fb) in zip(plan.coefficients, ads, parts)
                ],
                1,
            ),
        )
    for s in plan.saved:  # as PEFT saves modules_to_save, so PeftModel.from_pretrained loads the merged head
        w.write(peft_files.saved_file_key(s.tensor.name), saved_value(s, ads, inp.base))
    files = w.close()

    cfg = dict(ads[0].config)
    r = Counter(total.values()).most_common(1)[0][0]
    pattern = {m: n for m, n in total.items() if n != r}
    same_targets = all(a.config.get("target_modules") == cfg.get("target_modules") for a in ads)
    cfg.update(
        r=r,
        lora_alpha=float(r),  # scaling 1: the coefficients are already in B
        rank_pattern=pattern,
        alpha_pattern={m: float(n) for m, n in pattern.items()},
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        modules_to_save=_saved_modules(plan, ads),
        inference_mode=True,
        base_model_name_or_path=str(inp.base.folder),
    )
    if not same_targets or not cfg.get("target_modules"):
        cfg.update(target_modules=list(inp.modules), layers_to_transform=None, layers_pattern=None)
    (tmp / peft_files.CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    meta = {
        "kind": "independent",  # W_hat = W_0 + this adapter's delta
        "base_model": inp.base.spec,
        "base_fingerprint": inp.base.fingerprint,
        "labels": _labels(ads),
        "method": plan.method.name,
        "merged_from": [str(a.path) for a in ads],
    }
    (tmp / peft_files.META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [*files, tmp / peft_files.CONFIG, tmp / peft_files.META]


def write_full(tmp: Path, plan: MergePlan, inp: Inputs, norms: dict, max_shard_size: str) -> list[Path]:
    """A Hugging Face model folder with W_hat in the base's dtypes, sharded like the base's save_pretrained."""
    weights = inp.base.weights
    module_of = {k: m for m, k in inp.keys.items()}
    index = {m: i for i, m in enumerate(inp.modules)}
    saved = {s.tensor.model_key: s for s in plan.saved}
    added = [s.tensor for s in plan.saved if s.tensor.base_key is None]  # a head the base checkpoint lacks
    specs = [TensorSpec(k, weights.dtype(k), tuple(weights.shape(k))) for k in weights.keys()]
    specs += [TensorSpec(t.model_key, t.dtype, t.shape) for t in added]
    w = SafetensorsWriter(tmp, specs, stem="model", max_shard_bytes=parse_size(max_shard_size))
    for k in [*weights.keys(), *(t.model_key for t in added)]:
        m = module_of.get(k)
        if k in saved:
            t = saved_value(saved[k], inp.adapters, inp.base).to(saved[k].tensor.dtype)
        else:
            t = weights.get(k)
        if m is not None:
            d = module_delta(plan, inp.adapters, index[m], m, norms)
            t = apply_delta(t, d, check=f"{weights.folder}: merged {k}")
        w.write(k, t)
        del t
    files = w.close()
    for p in sorted(
        inp.base.folder.iterdir()
    ):  # config, tokenizer or image processor, generation config, ...
        if p.is_file() and merged_files.is_companion(p.name):
            shutil.copy2(p, tmp / p.name)
            files.append(tmp / p.name)
    for sub in pooling_files.module_folders(inp.base.folder):  # a sentence encoder's pooling, for export
        shutil.copytree(inp.base.folder / sub, tmp / sub)
        files += sorted(p for p in (tmp / sub).rglob("*") if p.is_file())
    last = inp.adapters[-1]
    rc = last.run_config or {}
    meta = {
        "method": plan.method.name,
        "alphas": plan.alphas,
        "tasks": [a.name for a in inp.adapters],
        "data": rc.get("data"),
        "seed": rc.get("seed", 0),
        "max_length": inp.max_length,
        "base_model": inp.base.spec,
        "base_fingerprint": inp.base.fingerprint,
    }
    write_json(tmp / merged_files.META, meta)
    return [*files, tmp / merged_files.META]


def _saved_modules(plan: MergePlan, ads: list[AdapterInput]) -> list[str] | None:
    """adapter_config.json's modules_to_save for the merged adapter: the adapters' entries (PEFT wraps the
    modules they name), None when nothing is carried."""
    if not plan.saved:
        return None
    return sorted({e for a in ads for e in a.saved_modules})


def _labels(ads: list[AdapterInput]) -> list[str]:
    return list(dict.fromkeys(y for a in ads for y in a.labels))


def _input_record(a: AdapterInput) -> dict:
    return {
        "path": str(a.path.resolve()),
        "name": a.name,
        "kind": a.kind,
        "task": a.meta.get("task"),
        "ranks": sorted({m.rank for m in a.modules.values()}),
        "scaling": sorted({m.scaling for m in a.modules.values()}),
        "fisher": a.fisher_source,
        "sha256": {f: sha256_file(a.path / f) for f in peft_files.FILES if (a.path / f).is_file()},
    }


def merge_adapters(
    adapters: list[Path | str],
    out: Path | str,
    base: str | None = None,
    options: MergeOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Merge adapter folders (or RUNs) into OUT in `options.format`; returns the report also written to
    OUT/merge_report.json. Any problem with the inputs is a PMError raised before OUT exists."""
    t0 = time.perf_counter()
    opts = options or MergeOptions()
    opts.validate()
    out = Path(out)
    check_new_out(out)
    ads = [read_adapter(p) for p in expand_inputs(adapters)]
    opts.validate(len(ads))
    inputs = check_inputs(ads, resolve_base(base, ads), opts.saved_modules)
    log(f"{len(ads)} adapters, {len(inputs.modules)} modules, base {inputs.base.folder}")
    plan = plan_merge(inputs, opts, log)
    # a causal LM has no classifier to carry or calibrate: it generates its answers
    decoder = is_decoder(json.loads((inputs.base.folder / "config.json").read_text()))
    if decoder and opts.calibrate:
        raise PMError(
            f"--calibrate: {inputs.base.folder} is a causal LM, which has no classifier to calibrate"
        )
    calibrate = calibration_tasks(opts.calibrate, opts.seed, ads) if opts.calibrate else None
    norms: dict[str, dict] = {}
    with atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's prune warns when density is 1
        if opts.format == "delta":
            files = write_delta(tmp, plan, inputs, norms)
        elif opts.format == "adapter":
            files = write_adapter(tmp, plan, inputs, norms)
        else:
            files = write_full(tmp, plan, inputs, norms, opts.max_shard_size)
        classifier = (
            None
            if decoder
            else write_classifier(
                tmp,
                inputs,
                lambda i, m: module_delta(plan, ads, i, m),
                opts.calibrate,
                calibrate,
                opts.calibrate_head,
                opts.seed,
                _labels(ads),
                log,
            )
        )
        report = {
            "method": plan.method.name,
            "format": opts.format,
            "alphas": plan.alphas,
            "weights": plan.weights,
            "coefficients": plan.coefficients,
            "fisher": plan.fisher,
            "clip": plan.clip if plan.method.name == "pm" else None,
            "density": plan.density,
            "seed": opts.seed if plan.method.sparsify == "random" else None,
            "options": asdict(opts),
            "base": {
                "model": inputs.base.spec,
                "path": str(inputs.base.folder.resolve()),
                "fingerprint": inputs.base.fingerprint,
            },
            "inputs": [_input_record(a) for a in ads],
            "labels": _labels(ads),
            "classifier": classifier,
            "saved_modules": saved_record(plan.saved, opts.saved_modules, inputs.base.folder),
            "notes": inputs.warnings + plan.notes,
            "outputs": sorted(p.relative_to(tmp).as_posix() for p in files),
            "modules": norms,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / merged_files.REPORT, report)
        (tmp / MODEL_CARD).write_text(merged_card(report))
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal: method, alphas or weights, Fisher source, notes."""
    lines = [f"method {report['method']}, format {report['format']}, {len(report['inputs'])} adapters"]
    if report["alphas"] is not None:
        lines.append("alphas " + " ".join(f"{a:.4g}" for a in report["alphas"]))
    if report["weights"] is not None:
        lines.append("weights " + " ".join(f"{w:.4g}" for w in report["weights"]))
    if report["fisher"]:
        lines.append(f"fisher: {report['fisher']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
