"""Intents and out-of-scope rejection on CLINC150 (issue 36): after every task of a `pmserve train` run, the
ridge head's in-scope accuracy on the test requests of every intent seen, without and with out-of-scope
rejection, and the share of CLINC150's out-of-scope test requests it rejects.

    python benchmarks/intents.py --methods frozen pm --seeds 0 1 2 --name clinc150
    python benchmarks/intents.py --report clinc150          # the tables of stored results, no training
    python benchmarks/quality.py --paired clinc150          # pm - frozen etc. with 95% t intervals

The threshold is set during training from each task's own in-scope training requests (pmserve.rejection); the
out-of-scope test requests are only measured here, never used to choose anything; on CLINC150 the same
figures on its validation split (`val`: the seen intents' validation requests and oos_val) are what an
acceptance may be chosen by. Results go to
benchmarks/results/intents-NAME.json in quality.py's layout (method, by_head.ridge.ACC, config.seed), one run
appended at a time, plus per task: in-scope accuracy without and with rejection, out-of-scope recall, the
threshold, and the gate's decision where there is one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import RESULTS, append_result, read_json

ACCEPTS = (0.999, 0.995, 0.99, 0.98, 0.95)  # other in-scope acceptance targets, read from the same histogram


def measure(learner, tests: list, oos, cos_counts=None) -> dict:
    """In-scope accuracy without / with rejection over `tests` (seen tasks' test splits, pooled), and the
    out-of-scope recall on `oos` (a Split of out-of-scope requests), with the --head classifier (ridge with
    --reject); `by_accept`: the same at other acceptance targets, from the same calibration histogram.
    `cosine`: the same for the candidate score `top_cosine`, its thresholds from `cos_counts`."""
    from pmserve.rejection import threshold

    clf = next(iter(learner.classifiers.values()))
    ok, best, fit = [], [], []
    for split in tests:
        f = learner.features(split)
        s = clf.scores(f)
        ok += [clf.labels[k] == y for k, y in zip(s.argmax(1).tolist(), split.labels)]
        best += s.max(1).values.tolist()
        fit += top_cosine(clf, f).tolist()
    f_oos = learner.features(oos)
    oos_best, oos_fit = clf.scores(f_oos).max(1).values, top_cosine(clf, f_oos)

    def at(t: float, best=best, oos_best=oos_best) -> dict:
        kept = sum(o and b >= t for o, b in zip(ok, best)) / len(ok)
        return {"acc_reject": kept, "oos_recall": float((oos_best < t).double().mean()), "threshold": t}

    out = {"acc": sum(ok) / len(ok), **at(clf.threshold())}
    out["by_accept"] = {str(a): at(threshold(clf.counts, a)) for a in ACCEPTS}
    if cos_counts is not None:
        out["cosine"] = {str(a): at(threshold(cos_counts, a), fit, oos_fit) for a in ACCEPTS}
    return out


def top_cosine(clf, feats):
    """The candidate out-of-scope score (pmserve.rejection.top_cosines) of features under ridge's Q."""
    from pmserve.rejection import top_cosines

    return top_cosines(clf.project(feats), clf.Q).float()


def cosine_counts(clf, feats, labels):
    """The candidate's calibration histogram for a task's training rows just after its fit: leave-one-out
    (pmserve.rejection.loo_top_cosines), for the rows ridge's leave-one-out classifies right."""
    from pmserve.rejection import histogram, loo_ridge_scores, loo_top_cosines

    h, y = clf.project(feats), clf._targets(labels)
    yi = y.argmax(1)
    right = loo_ridge_scores(h, y, clf.G, clf.lam, clf.W).argmax(1) == yi
    return histogram(loo_top_cosines(h, yi, clf.Q)[right])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin:clinc150")
    ap.add_argument("--methods", nargs="+", default=["frozen", "pm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--reject", type=float, default=0.99)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pmserve-intents"))
    ap.add_argument("--name", default="clinc150")
    ap.add_argument("--report", nargs="+", metavar="NAME", help="print stored results and stop")
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra TrainConfig fields as key=value (JSON values)"
    )
    args = ap.parse_args()
    if args.report:
        for name in args.report:
            print(f"## {name}\n\n{report(read_json(RESULTS / f'intents-{name}.json'))}\n")
        return
    from torch import float64, zeros

    from pmserve.rejection import BINS
    from pmserve.tasks import Split, builtin_tasks, clinc150_records
    from pmserve.train import TrainConfig, train

    def split(records) -> Split:
        return Split([r.text for r in records], [r.intent for r in records])

    oos, oos_val = split(clinc150_records("oos_test")), split(clinc150_records("oos_val"))
    val = clinc150_records("val")  # in scope: chooses an acceptance where the test split only reports
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    res_path = RESULTS / f"intents-{args.name}.json"
    results = read_json(res_path, [])
    for seed in args.seeds:
        tasks = builtin_tasks(args.data, seed)
        for method in args.methods:
            label = method + ("+gate" if extra.get("gate") else "")  # a variant is its own row
            if any(r["method"] == label and r["config"]["seed"] == seed for r in results):
                continue
            cfg = TrainConfig(data=args.data, method=method, reject=args.reject, seed=seed, **extra)
            if method == "joint":  # the upper bound of PM_METHOD.md: 3 epochs at lr 5e-4
                cfg.epochs, cfg.lr = 3, 5e-4
            per_task: list[dict] = []
            cos_counts = zeros(BINS, dtype=float64)  # the candidate score's calibration histogram

            def on_task(
                i: int,
                learner,
                tasks=tasks,
                per_task=per_task,
                method=method,
                seed=seed,
                label=label,
                cos_counts=cos_counts,
            ) -> None:
                seen = tasks if method == "joint" else tasks[: i + 1]
                clf = next(iter(learner.classifiers.values()))
                for t in seen if method == "joint" else seen[-1:]:
                    cos_counts += cosine_counts(clf, learner.features(t.train), t.train.labels)
                per_task.append({"task": i, **measure(learner, [t.test for t in seen], oos, cos_counts)})
                if "clinc150" in args.data:
                    known = {y for t in seen for y in t.classes}
                    val_known = split([r for r in val if r.intent in known])
                    per_task[-1]["val"] = measure(learner, [val_known], oos_val, cos_counts)
                p = per_task[-1]
                print(
                    f"  {label} s{seed} task {i}: {p['acc']:.4f} {p['acc_reject']:.4f} {p['oos_recall']:.3f}",
                    flush=True,
                )

            out = args.out / f"{args.name}-{label}-s{seed}"
            r = train(cfg, out, progress=False, log=lambda *_: None, on_task=on_task)
            infos = [json.loads(p.read_text()) for p in sorted(out.glob("tasks/*/task.json"))]
            r.pop("config", None)
            r["method"], r["config"] = (
                label,
                {"seed": seed, "reject": args.reject, "data": args.data, **extra},
            )
            r["intents"] = per_task
            r["gate"] = [i.get("gate") for i in infos]
            results = append_result(res_path, r)
            print(
                f"{method} seed {seed}: ridge {r['by_head']['ridge']['ACC']:.4f}  {per_task[-1]}", flush=True
            )
    print(report(results))


def report(results: list[dict]) -> str:
    """Per run, after every task: in-scope accuracy without / with rejection and the out-of-scope recall."""
    rows = [
        "| method | seed | seconds | after task: acc / acc with rejection / oos recall |",
        "|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["method"], r["config"]["seed"])):
        cells = "; ".join(
            f"{p['task']}: {p['acc']:.3f}/{p['acc_reject']:.3f}/{p['oos_recall']:.2f}" for p in r["intents"]
        )
        rows.append(f"| {r['method']} | {r['config']['seed']} | {r['seconds']:.0f} | {cells} |")
    last = {}
    for r in results:
        p = r["intents"][-1]
        last.setdefault(r["method"], []).append((p["acc_reject"] / p["acc"], p["oos_recall"]))
    rows += [
        "",
        "| method | runs | kept in-scope accuracy (last task) | oos recall (last task) |",
        "|---|---|---|---|",
    ]
    for m, v in last.items():
        rows.append(
            f"| {m} | {len(v)} | {statistics.mean(k for k, _ in v):.4f} | {statistics.mean(o for _, o in v):.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
