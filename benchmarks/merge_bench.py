"""`pmserve merge` against PEFT: speed and memory on a 1 GB model, quality on a real run's adapters.

speed: a synthetic BERT base (hidden 1280, 24 layers, intermediate 5120: 512M parameters, 1.02 GB in bf16, random
weights written straight into model.safetensors) and 10 synthetic rank-16 LoRA adapters (fp32, lora_alpha 32) on
query, key, value and every `dense` linear (attention output and both MLP matrices). Each merge runs in its own
subprocess, `--format full` (a complete bf16 HF model folder, as PEFT's save_pretrained writes one):
  ours: `python -m pmserve merge a0 .. a9 --base BASE --method M --format full`, for pm (no Fisher files: the
        identity-Hessian closed form, which for independent adapters is their average), avg and ties;
  PEFT: AutoModel.from_pretrained(BASE, dtype=bf16), PeftModel.from_pretrained + load_adapter for the 10 adapters,
        add_weighted_adapter, merge_and_unload, save_pretrained: combination_type "cat" with weights 1/10 for pm and
        avg (the same merged model), "ties" with density 0.5 for ties (PEFT's ties prunes and elects signs on the
        factors, ours on the full task vectors, as PEFT's exact ties_svd does before its SVD; ties_svd itself is
        far slower and was not run).
Wall time and peak RSS (os.wait4's ru_maxrss) of each subprocess; MB/s is (base + adapter bytes) / wall time.
Runs alternate ours / PEFT per method so both see the same machine load; medians over --runs.
The files stay in the page cache between runs (both sides read warm files).

quality: the adapters of a finished `pmserve train` run on builtin:wordnet-nouns (5 tasks, all-MiniLM-L6-v2,
rank-10 LoRA on key/value, chained: each task trained on the run's previous merged model). Each method merges the
run's adapters offline (`merge_adapters(..., format="delta")`), the merged W_hat is loaded into the base model and
ACC = mean over tasks of test accuracy over all 20 classes is measured with
  stored: the run's own classifiers from its last task folder (the linear training head, and the prototype and
          ridge statistics). Their prototype/ridge statistics were computed with the run's own merged backbone
          after each task, so for any other merge they are mismatched (features moved, statistics did not): only
          the row that reproduces the run (pm/merge with its Fisher files) is a fair use of them;
  refit:  prototype and ridge classifiers refitted on the training features of every task computed with the
          evaluated merged model itself (ridge: same seed, projection and per-task lambda choice as training).
          This is the same classifier for every method, so it compares the backbones. It is not the run's
          exemplar-free protocol (old tasks' statistics are recomputed with the final model), which flatters no
          method in particular.
Methods: pm (the run's Fisher files, = the run's merge), pm-identity (F = 1), pm-data (Fisher from --data with a
prototype head, as for foreign adapters; optional, slow), avg, linear, task-arithmetic, ties, dare-linear,
dare-ties (weights 1, density 0.5, seed 0).

    .venv/bin/python benchmarks/merge_bench.py speed --runs 3
    .venv/bin/python benchmarks/merge_bench.py speed --smoke --json /tmp/merge_bench-smoke.json   # seconds
    .venv/bin/python benchmarks/merge_bench.py quality --runs-dir /tmp/pmq [--pm-data]
Writes benchmarks/results/merge_bench.json and merge_quality.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, clean_env, measure, medians, write_json

SPEED_METHODS = ("pm", "avg", "ties")
QUALITY_METHODS = (
    "pm",
    "pm-identity",
    "avg",
    "linear",
    "task-arithmetic",
    "ties",
    "dare-linear",
    "dare-ties",
)

# ---------------------------------------------------------------- speed: synthetic inputs


def build_base(folder: Path, hidden: int, layers: int, inter: int) -> Path:
    """A BertModel folder with random bf16 weights, written tensor by tensor (no model in memory)."""
    import torch
    from transformers import BertConfig, BertModel

    from pmserve.tensor_io import SafetensorsWriter, TensorSpec

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=inter,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BertModel(cfg, add_pooling_layer=False).state_dict().items()}
    w = SafetensorsWriter(folder, [TensorSpec(k, torch.bfloat16, s) for k, s in shapes.items()])
    g = torch.Generator().manual_seed(0)
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.zeros(s)
        w.write(k, t.to(torch.bfloat16))
    w.close()
    cfg.save_pretrained(str(folder))
    return folder


def build_adapters(
    base: Path, out: Path, n: int, rank: int, layers: int, hidden: int, inter: int
) -> list[Path]:
    """n PEFT LoRA adapter folders (fp32 factors, random A and B) on query/key/value/dense."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = {}
    for layer in range(layers):
        p = f"encoder.layer.{layer}."
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            shapes[p + m] = (hidden, hidden)
        shapes[p + "intermediate.dense"] = (inter, hidden)
        shapes[p + "output.dense"] = (hidden, inter)
    folders = []
    for i in range(n):
        d = out / f"a{i}"
        folders.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(100 + i)
        t = {}
        for m, (o, inp) in shapes.items():
            t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
            t[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 1e-3
        save_file(t, str(d / "adapter_model.safetensors"))
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["query", "key", "value", "dense"],
            base_model_name_or_path=str(base),
        )
        cfg.save_pretrained(str(d))
    return folders


PEFT_SCRIPT = r"""
import sys, warnings, torch
warnings.simplefilter("ignore")
from transformers import AutoModel
from peft import PeftModel
base, out, method, *adapters = sys.argv[1:]
model = AutoModel.from_pretrained(base, dtype=torch.bfloat16, add_pooling_layer=False)
names = [f"a{i}" for i in range(len(adapters))]
model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, path in zip(names[1:], adapters[1:]):
    model.load_adapter(path, adapter_name=name)
if method == "ties":
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="ties", density=0.5)
else:
    model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type="cat")
model.set_adapter("merged")
merged = model.merge_and_unload(adapter_names=["merged"])
merged.save_pretrained(out)
"""


def speed(args) -> dict:
    work = Path(args.work)
    spec = dict(hidden=1280, layers=24, inter=5120)
    if args.smoke:  # a check that both sides still run, in seconds; its figures mean nothing
        work, spec = work / "smoke", dict(hidden=128, layers=2, inter=512)
        args.runs, args.adapters = 1, min(args.adapters, 2)
    t0 = time.perf_counter()
    base = build_base(work / "base", **spec)
    adapters = build_adapters(
        base, work / "adapters", args.adapters, 16, spec["layers"], spec["hidden"], spec["inter"]
    )
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    in_bytes = (base / "model.safetensors").stat().st_size + sum(
        (a / "adapter_model.safetensors").stat().st_size for a in adapters
    )
    env = clean_env()  # pmserve from the installed .venv; PEFT's transformers must find the PyPI `kernels`
    script = work / "peft_merge.py"
    script.write_text(PEFT_SCRIPT)
    rows = {m: {"ours": [], "peft": []} for m in args.methods}
    for r in range(args.runs):
        for m in args.methods:
            for who in ("ours", "peft"):
                out = work / f"out-{who}-{m}"
                shutil.rmtree(out, ignore_errors=True)
                if who == "ours":
                    cmd = [sys.executable, "-m", "pmserve", "merge", *map(str, adapters), "--base", str(base)]
                    cmd += ["--out", str(out), "--method", m, "--format", "full", "--quiet"]
                else:
                    cmd = [sys.executable, str(script), str(base), str(out), m, *map(str, adapters)]
                res = measure(cmd, env)
                rows[m][who].append(res)
                print(
                    f"run {r + 1} {m:5s} {who:4s} {res['seconds']:7.1f} s {res['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
    table = []
    for m in args.methods:
        med = {who: medians(rows[m][who], ("seconds", "peak_rss_mb")) for who in ("ours", "peft")}
        table.append(
            {
                "method": m,
                "ours_s": med["ours"]["seconds"],
                "peft_s": med["peft"]["seconds"],
                "speedup": med["peft"]["seconds"] / med["ours"]["seconds"],
                "ours_mb": med["ours"]["peak_rss_mb"],
                "peft_mb": med["peft"]["peak_rss_mb"],
                "memory_ratio": med["ours"]["peak_rss_mb"] / med["peft"]["peak_rss_mb"],
                "ours_mb_s": in_bytes / 1e6 / med["ours"]["seconds"],
                "peft_mb_s": in_bytes / 1e6 / med["peft"]["seconds"],
            }
        )
    result = {
        "base": {"bytes": (base / "model.safetensors").stat().st_size, **spec, "dtype": "bfloat16"},
        "adapters": {
            "n": len(adapters),
            "rank": 16,
            "bytes": in_bytes - (base / "model.safetensors").stat().st_size,
        },
        "runs": args.runs,
        "cpu_count": os.cpu_count(),
        "table": table,
        "raw": rows,
    }
    write_json(args.json, result)
    print(
        f"\nbase {result['base']['bytes'] / 1e9:.2f} GB bf16, {len(adapters)} adapters rank 16 "
        f"({result['adapters']['bytes'] / 1e6:.0f} MB), --format full, median of {args.runs}\n"
    )
    print(
        "| method | ours s | PEFT s | speedup | ours peak MB | PEFT peak MB | memory ratio | ours MB/s | PEFT MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(
            f"| {t['method']} | {t['ours_s']:.1f} | {t['peft_s']:.1f} | {t['speedup']:.2f}x | {t['ours_mb']:.0f} | "
            f"{t['peft_mb']:.0f} | {t['memory_ratio']:.2f} | {t['ours_mb_s']:.0f} | {t['peft_mb_s']:.0f} |"
        )
    return result


# ---------------------------------------------------------------- quality


def quality(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from pmserve.adapters import set_merged
    from pmserve.backbone import load_encoder, split_features
    from pmserve.heads import Prototypes, Ridge, load_scorer
    from pmserve.merging import MergeOptions, merge_adapters
    from pmserve.tasks import load_tasks

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {}
    for run_name in args.runs_from:
        run = Path(args.runs_dir) / run_name
        cfg = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        tasks = load_tasks(cfg["data"], cfg["seed"])
        encoder, prep, _ = load_encoder(cfg["model"], tasks[0].kind, cfg["max_length"])
        mods = dict(encoder.model.named_modules())
        last = sorted(p for p in (run / "tasks").iterdir() if p.is_dir())[-1]
        stored = {"linear": load_scorer(last, "head")}
        for h in cfg.get("eval_heads", []):
            stored[h] = load_scorer(last, f"eval-{h}")
        if cfg["head"] != "linear":
            stored[cfg["head"]] = load_scorer(last, "classifier")
        rows, base = [], None
        methods = list(args.methods) + (["pm-data"] if args.pm_data else [])
        with tempfile.TemporaryDirectory(prefix="pmq-merge-") as tmp:
            tmp = Path(tmp)
            no_fisher = tmp / "no-fisher"
            task_dirs = sorted(p for p in (run / "tasks").iterdir() if p.is_dir())
            for d in task_dirs:
                shutil.copytree(
                    d, no_fisher / "tasks" / d.name, ignore=shutil.ignore_patterns("fisher.safetensors")
                )
            shutil.copy(run / "config.json", no_fisher / "config.json")
            for method in methods:
                t0 = time.perf_counter()
                name = {"pm-identity": "pm", "pm-data": "pm"}.get(method, method)
                src = [no_fisher] if method in ("pm-identity", "pm-data") else [run]
                opts = MergeOptions(
                    name, "delta", data=cfg["data"] if method == "pm-data" else None, seed=cfg["seed"]
                )
                rep = merge_adapters(src, tmp / method, options=opts, log=lambda *_: None)
                merged = load_file(str(tmp / method / "merged.safetensors"))
                if base is None:  # W_0 of the adapted matrices, before any merge is written in
                    base = {k: mods[k].weight.detach().clone() for k in merged}
                set_merged(encoder.model, base, merged)
                train_f = [split_features(encoder, prep, t.train, torch.device("cpu")) for t in tasks]
                test_f = [split_features(encoder, prep, t.test, torch.device("cpu")) for t in tasks]
                refit = {
                    "prototype": Prototypes(train_f[0].shape[1]),
                    "ridge": Ridge(
                        train_f[0].shape[1], cfg["ridge_dim"], cfg["seed"], cfg["ridge_lambda"] or None
                    ),
                }
                for i, (t, f) in enumerate(zip(tasks, train_f)):
                    refit["prototype"].update(f, t.train.labels)
                    refit["ridge"].fit(f, t.train.labels, seed=cfg["seed"] * 31 + i)
                acc = {}
                for group, clfs in (("stored", stored), ("refit", refit)):
                    for h, clf in clfs.items():
                        per = []
                        for t, f in zip(tasks, test_f):
                            pred = clf.scores(f).argmax(1).tolist()
                            per.append(
                                sum(clf.labels[p] == y for p, y in zip(pred, t.test.labels)) / len(pred)
                            )
                        acc[f"{group}-{h}"] = sum(per) / len(per)
                rows.append(
                    {
                        "method": method,
                        "alphas": rep["alphas"],
                        "weights": rep["weights"],
                        "fisher": rep["fisher"],
                        "acc": acc,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(
                    f"{run_name} {method:16s} " + " ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True
                )
        results[run_name] = {
            "config": {
                k: cfg[k]
                for k in ("data", "model", "method", "rank", "target_modules", "seed", "head", "eval_heads")
            },
            "run_ACC": {h: v["ACC"] for h, v in metrics["by_head"].items()},
            "run_alphas": metrics["alphas"],
            "rows": rows,
        }
    write_json(RESULTS / "merge_quality.json", results)
    for run_name, res in results.items():
        cols = list(res["rows"][0]["acc"])
        print(
            f"\n{run_name}: the run's own ACC " + ", ".join(f"{h} {v:.4f}" for h, v in res["run_ACC"].items())
        )
        print("| method | alphas / weights | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for r in res["rows"]:
            coef = r["alphas"] if r["alphas"] is not None else r["weights"]
            best = {c: max(x["acc"][c] for x in res["rows"]) for c in cols}
            cells = [
                (f"**{r['acc'][c]:.3f}**" if r["acc"][c] == best[c] else f"{r['acc'][c]:.3f}") for c in cols
            ]
            print(f"| {r['method']} | {', '.join(f'{a:.3g}' for a in coef)} | " + " | ".join(cells) + " |")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--adapters", type=int, default=10)
    s.add_argument("--methods", nargs="+", default=list(SPEED_METHODS))
    s.add_argument("--work", default="/tmp/pmbench")
    s.add_argument("--json", type=Path, default=RESULTS / "merge_bench.json")
    s.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model (hidden 128, 2 layers), 2 adapters, 1 run: runs, no figures",
    )
    q = sub.add_parser("quality")
    q.add_argument("--runs-dir", default="/tmp/pmq")
    q.add_argument("--runs-from", nargs="+", default=["wordnet-nouns-pm-s0", "wordnet-nouns-merge-s0"])
    q.add_argument("--methods", nargs="+", default=list(QUALITY_METHODS))
    q.add_argument("--pm-data", action="store_true", help="also pm with the Fisher from --data (slow)")
    args = ap.parse_args()
    speed(args) if args.what == "speed" else quality(args)


if __name__ == "__main__":
    main()
