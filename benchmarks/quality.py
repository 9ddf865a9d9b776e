"""Quality benchmark: every method side by side on a built-in sequence, several seeds, every inference head.

    python benchmarks/quality.py --data builtin:wordnet-nouns --seeds 0 1 2 --out /tmp/pmq
Each (method, seed) is one `pmserve train` run that measures the linear training head and the prototype and
ridge classifiers side by side (--eval-heads), so heads are compared on identical backbones. Results go to
benchmarks/results/quality-<name>.json (appended run by run, so a long sweep can be read while it goes) and a
Markdown table of mean +- std is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pmserve.train import TrainConfig, train

METHODS = ["pm", "merge", "seq", "frozen", "joint", "avg"]


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def table(results: list[dict], heads: list[str]) -> str:
    """One Markdown row per (head, method): ACC, AAA and forgetting as mean ± std over the seeds run."""
    rows = [
        "| head | method | seeds | ACC | AAA | forgetting | alphas (first seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in heads:
        for m in METHODS:
            rs = [r for r in results if r["method"] == m]
            if not rs:
                continue
            cells = [
                _mean_std([r["by_head"][h][k] for r in rs if r["by_head"][h][k] is not None])
                for k in ("ACC", "AAA", "forgetting")
            ]
            alphas = ", ".join("-" if x is None else f"{x:.2g}" for x in rs[0]["alphas"])
            rows.append(f"| {h} | {m} | {len(rs)} | " + " | ".join(cells) + f" | {alphas} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin:wordnet-nouns")
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-head", default="linear")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pmserve-quality"))
    ap.add_argument("--name", default="wordnet-nouns")
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra TrainConfig fields as key=value (JSON values)"
    )
    args = ap.parse_args()
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    heads = [args.train_head, "prototype", "ridge"]
    res_path = Path(__file__).parent / "results" / f"quality-{args.name}.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else []
    for seed in args.seeds:
        for method in args.methods:
            if any(r["method"] == method and r["config"]["seed"] == seed for r in results):
                continue
            cfg = TrainConfig(
                data=args.data,
                model=args.model,
                method=method,
                head=args.train_head,
                eval_heads=heads[1:],
                epochs=args.epochs,
                seed=seed,
                **extra,
            )
            if method == "joint":  # the upper bound of PM_METHOD.md: 3 epochs at lr 5e-4
                cfg.epochs, cfg.lr = 3, 5e-4
            r = train(
                cfg,
                args.out / f"{args.name}-{method}-s{seed}",
                resume=True,
                progress=False,
                log=lambda *_: None,
            )
            r.pop("config", None)
            r["config"] = {"seed": seed, **extra}
            results.append(r)
            res_path.write_text(json.dumps(results, indent=1))
            print(
                f"{method} seed {seed}: " + "  ".join(f"{h} {r['by_head'][h]['ACC']:.3f}" for h in heads),
                flush=True,
            )
    print(table(results, heads))


if __name__ == "__main__":
    main()
