"""Quality benchmark: every method side by side on a built-in sequence, several seeds, every inference head.

    python benchmarks/quality.py --sequence nouns --seeds 0 1 2 --out /tmp/pmq
    python benchmarks/quality.py --report i17-nouns i17-long     # the stored results' tables, no training
    python benchmarks/quality.py --paired i17-nouns i17-nouns-s34   # pm - frozen, - avg, - merge, / joint
    python benchmarks/quality.py --versus wordnet-nouns-all-linear i17-nouns   # B - A by (method, seed)
    python benchmarks/quality.py --between avg pm i17class-nouns i17class-nouns-s34   # method B - A by seed
    python benchmarks/quality.py --data builtin:clinc150-gen --model builtin:smollm2 --name clinc150-gen \
        --methods pm merge avg seq joint frozen --seeds 0 1 2 --set 'device="cuda"'   # a decoder (issue 35)
Each (method, seed) is one `pmserve train` run that measures the linear training head and the prototype and
ridge classifiers side by side (--eval-heads), so heads are compared on identical backbones; each seed draws its
own class order. Results go to benchmarks/results/quality-<name>.json (appended run by run, so a long sweep can
be read while it goes). The tables give, per method and head, the mean ± std over seeds and every seed's value,
and per run the alphas (their minimum first), the ridge lambdas and how many sat at the end of their grid.
Every comparison is paired by seed and reported as the mean difference with its 95% t interval
(pmserve.metrics.paired_interval), in points. A generative sequence (a decoder's) has one measure, exact match
("exact" in place of a head), and takes the decoders' own defaults for every option not --set or --epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import RESULTS, append_result, read_json

from pmserve.metrics import paired_interval

METHODS = ["pm", "merge", "seq", "frozen", "joint", "avg"]
SEQUENCES = {  # --sequence: the sequences issue 17's targets are stated on
    "nouns": "builtin:wordnet-nouns",
    "verbs": "builtin:wordnet-verbs",
    "long": "builtin:wordnet-nouns:tasks=10,classes=2",
}


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


COMPARISONS = [  # (B, A, how): the targets of issues 35 and 36, B - A in points or B / A
    ("pm", "frozen", "-"),
    ("pm", "seq", "-"),
    ("pm", "avg", "-"),
    ("pm", "merge", "-"),
    ("pm", "joint", "/"),
    ("pm+gate", "frozen", "-"),
    ("pm+gate", "pm", "-"),
]


def interval(d: list[float], unit: str = "") -> str:
    """'mean [low, high]' of paired differences: the 95% t interval over seeds."""
    m, lo, hi = paired_interval(d)
    f = ".2f" if unit == "%" else "+.2f"  # a ratio has no sign
    return f"{m:{f}}{unit} [{lo:{f}}, {hi:{f}}]" if len(d) > 1 else f"{m:{f}}{unit} (one seed: no interval)"


def comparisons(results: list[dict], head: str = "ridge") -> str:
    """Every COMPARISONS pair the results hold: per seed, and the mean with its 95% t interval. B - A in
    points of ACC; B / A as a percentage of A."""
    acc = {(r["method"], _seed(r)): _head(r, head)["ACC"] for r in results}
    rows = ["| comparison | seeds | per seed | mean [95% t interval] |", "|---|---|---|---|"]
    for b, a, how in COMPARISONS:
        seeds = sorted(s for m, s in acc if m == b and (a, s) in acc)
        if not seeds:
            continue
        if how == "-":
            d = [100 * (acc[b, s] - acc[a, s]) for s in seeds]
            name, unit = f"{b} - {a} (points)", ""
        else:
            d = [100 * acc[b, s] / acc[a, s] for s in seeds]
            name, unit = f"{b} / {a} (%)", "%"
        per = ", ".join(f"s{s} {x:+.2f}" if how == "-" else f"s{s} {x:.2f}" for s, x in zip(seeds, d))
        rows.append(f"| {name} | {len(seeds)} | {per} | {interval(d, unit)} |")
    return "\n".join(rows)


def _seed(r: dict) -> int:
    return r["config"]["seed"]


def _head(r: dict, head: str) -> dict:
    """The run's figures for `head`; a decoder run's for its one measure (exact match), whatever `head` says."""
    return r["by_head"].get(head) or r["by_head"][r["head"]]


def table(results: list[dict], heads: list[str]) -> str:
    """One Markdown row per (head, method): ACC as mean ± std and per seed, AAA and forgetting as mean ± std."""
    rows = [
        "| head | method | seeds | ACC | ACC per seed | AAA | forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in heads:
        for m in METHODS:
            rs = sorted((r for r in results if r["method"] == m and h in r["by_head"]), key=_seed)
            if not rs:
                continue
            cells = [
                _mean_std([r["by_head"][h][k] for r in rs if r["by_head"][h][k] is not None])
                for k in ("ACC", "AAA", "forgetting")
            ]
            per = ", ".join(f"s{_seed(r)} {r['by_head'][h]['ACC']:.3f}" for r in rs)
            rows.append(f"| {h} | {m} | {len(rs)} | {cells[0]} | {per} | {cells[1]} | {cells[2]} |")
    return "\n".join(rows)


def runs_table(results: list[dict]) -> str:
    """Per run: the minimum alpha and every alpha, the ridge lambdas, how many ended their grid, and the
    penalty of each task's drift map ("-": the stored statistics stayed; runs from before the record: none)."""
    rows = [
        "| method | seed | min alpha | alphas | ridge lambdas | at grid end | drift maps' mu |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (METHODS.index(r["method"]), _seed(r))):
        alphas = [a for a in r["alphas"] if a is not None]
        low = f"{min(alphas[1:]):.3g}" if len(alphas) > 1 else "-"
        lams = ", ".join("-" if x is None else f"{x:.2g}" for x in r["ridge_lambdas"])
        if "ridge_lambdas_on_edge" in r:
            edges = sum(bool(e) for e in r["ridge_lambdas_on_edge"])
        else:  # results from before the flag: the holdout rule's grid was 0.1 .. 1e6
            edges = sum(x in (0.1, 1e6) for x in r["ridge_lambdas"] if x is not None)
        shown = ", ".join(f"{a:.2g}" for a in alphas) or "-"
        mus = (
            ", ".join("-" if x is None else f"{x:.2g}" for x in r.get("ridge_drift_mus", []))
            or "not recorded"
        )
        rows.append(f"| {r['method']} | {_seed(r)} | {low} | {shown} | {lams} | {edges} | {mus} |")
    return "\n".join(rows)


def paired(a: list[dict], b: list[dict], a_name: str, b_name: str, head: str = "ridge") -> str:
    """B - A on `head`'s ACC for every (method, seed) both hold; `same backbone` when the other heads agree to
    1e-9 (then only `head` differs between the two runs: its classifier rule, not the training)."""
    rows = [
        f"| method | seed | {a_name} | {b_name} | difference | same backbone |",
        "|---|---|---|---|---|---|",
    ]
    diffs: dict[str, list[float]] = {}
    key = {(r["method"], _seed(r)): r for r in a}
    for r in sorted(b, key=lambda r: (METHODS.index(r["method"]), _seed(r))):
        old = key.get((r["method"], _seed(r)))
        if old is None:
            continue
        x, y = old["by_head"][head]["ACC"], r["by_head"][head]["ACC"]
        same = all(
            abs(old["by_head"][h]["ACC"] - r["by_head"][h]["ACC"]) < 1e-9
            for h in r["by_head"]
            if h != head and h in old["by_head"]
        )
        diffs.setdefault(r["method"], []).append(y - x)
        rows.append(
            f"| {r['method']} | {_seed(r)} | {x:.3f} | {y:.3f} | {y - x:+.3f} | {'yes' if same else 'no'} |"
        )
    for m, d in diffs.items():
        wins = sum(v > 0 for v in d)
        ci = interval([100 * v for v in d])
        rows.append(f"| {m} | mean (points, 95% t) | | | {ci} | {wins} of {len(d)} seeds up |")
    return "\n".join(rows)


def between(results: list[dict], a: str, b: str, head: str = "ridge") -> str:
    """Method b - method a on `head`'s ACC, seed by seed, over every seed both ran (several results files
    pooled): the paired comparison a target like "pm >= avg" turns on, with its mean, standard error and
    how many seeds b is level or ahead."""
    runs = {(r["method"], _seed(r)): r["by_head"][head]["ACC"] for r in results}
    seeds = sorted(s for m, s in runs if m == a and (b, s) in runs)
    rows = [f"| seed | {a} | {b} | {b} - {a} (points) |", "|---|---|---|---|"]
    d = [100 * (runs[b, s] - runs[a, s]) for s in seeds]
    rows += [f"| {s} | {runs[a, s]:.3f} | {runs[b, s]:.3f} | {x:+.1f} |" for s, x in zip(seeds, d)]
    if len(d) > 1:
        ahead = sum(x >= -1e-9 for x in d)
        rows.append(f"| mean [95% t] | | | {interval(d)}; {b} >= {a} on {ahead} of {len(d)} |")
    return "\n".join(rows)


def _results_file(name: str) -> Path:
    """quality-NAME.json, else intents-NAME.json (benchmarks/intents.py writes the same fields)."""
    q = RESULTS / f"quality-{name}.json"
    return q if q.exists() else RESULTS / f"intents-{name}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", choices=sorted(SEQUENCES), help="a named sequence: sets --data and --name")
    ap.add_argument("--data", default="builtin:wordnet-nouns")
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-head", default="linear")
    ap.add_argument("--epochs", type=int, help="epochs per task (default: the RUN's default)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pmserve-quality"))
    ap.add_argument("--name", default=None, help="results file quality-NAME.json (default: the sequence's)")
    ap.add_argument("--report", nargs="+", metavar="NAME", help="print the tables of stored results and stop")
    ap.add_argument(
        "--paired",
        nargs="+",
        metavar="NAME",
        help="pm - frozen, - avg, - merge and / joint (ridge ACC), paired by seed with 95%% t intervals, over "
        "the NAMEd results files pooled (quality-NAME.json or intents-NAME.json; a later file's run replaces an "
        "earlier one's of the same method and seed), and stop",
    )
    ap.add_argument(
        "--versus", nargs=2, metavar=("A", "B"), help="ridge ACC of B - A by (method, seed), and stop"
    )
    ap.add_argument(
        "--between",
        nargs="+",
        metavar="A B NAME",
        help="ridge ACC of method B - method A by seed, pooled over the NAMEd results files, and stop",
    )
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra TrainConfig fields as key=value (JSON values)"
    )
    args = ap.parse_args()
    heads = [args.train_head, "prototype", "ridge"]
    if args.paired:
        pooled = [r for n in args.paired for r in read_json(_results_file(n))]
        print(comparisons(pooled))
        return
    if args.versus:
        a, b = (read_json(RESULTS / f"quality-{n}.json") for n in args.versus)
        print(paired(a, b, *args.versus))
        return
    if args.between:
        if len(args.between) < 3:
            ap.error("--between: give two methods and at least one results NAME")
        a, b, *names = args.between
        pooled = [r for n in names for r in read_json(_results_file(n))]
        print(between(pooled, a, b))
        return
    if args.report:
        for name in args.report:
            results = read_json(RESULTS / f"quality-{name}.json")
            shown = heads if any(h in r["by_head"] for r in results for h in heads) else ["exact"]
            print(f"## {name}\n\n{table(results, shown)}\n\n{runs_table(results)}\n")
        return
    from pmserve.tasks import load_tasks
    from pmserve.train import TrainConfig, train

    if args.sequence:
        args.data = SEQUENCES[args.sequence]
    args.name = args.name or args.sequence or "wordnet-nouns"
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    res_path = RESULTS / f"quality-{args.name}.json"
    results = read_json(res_path, [])
    generative = load_tasks(args.data)[0].kind == "generative"
    if generative:  # no heads: exact match; the decoders' defaults for what is not given
        heads = ["exact"]
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    for seed in args.seeds:
        for method in args.methods:
            if any(r["method"] == method and r["config"]["seed"] == seed for r in results):
                continue
            if generative:
                given = {**extra, **epochs}
                cfg = TrainConfig(
                    data=args.data, model=args.model, method=method, seed=seed, **given, given=set(given)
                )
            else:
                cfg = TrainConfig(
                    data=args.data,
                    model=args.model,
                    method=method,
                    head=args.train_head,
                    eval_heads=heads[1:],
                    seed=seed,
                    **epochs,
                    **extra,
                )
            if method == "joint" and not generative:  # the upper bound of PM_METHOD.md: 3 epochs at lr 5e-4
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
            results = append_result(res_path, r)
            print(
                f"{method} seed {seed}: " + "  ".join(f"{h} {r['by_head'][h]['ACC']:.3f}" for h in heads),
                flush=True,
            )
    print(table(results, heads))
    print(runs_table(results))


if __name__ == "__main__":
    main()
