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
threshold, and the gate's decision where there is one. Beside the classifier's own rejection score (the fit,
for runs made now; `config.reject_score`), the other one ("top": ridge's top score, as runs before it did),
calibrated the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harness import RESULTS, append_result, read_json

ACCEPTS = (0.999, 0.995, 0.99, 0.98, 0.95)  # other in-scope acceptance targets, read from the same histogram


# the score measured beside the classifier's own (pmserve.rejection)
OTHER = {"cosine": "top", "top": "cosine"}


def measure(learner, tests: list, oos, other_counts=None) -> dict:
    """In-scope accuracy without / with rejection over `tests` (seen tasks' test splits, pooled), and the
    out-of-scope recall on `oos` (a Split of out-of-scope requests), with the --head classifier (ridge with
    --reject, by its own score); `by_accept`: the same at other acceptance targets, from the same calibration
    histogram. Under the other score's name (OTHER: "top" for today's classifiers, which reject by the fit):
    the same for that score, its thresholds from `other_counts`."""
    from pmserve.rejection import threshold

    clf = next(iter(learner.classifiers.values()))
    own, other = clf.reject_score, OTHER[clf.reject_score]
    ok, score = [], {own: [], other: []}
    for split in tests:
        f = learner.features(split)
        s = clf.scores(f)
        ok += [clf.labels[k] == y for k, y in zip(s.argmax(1).tolist(), split.labels)]
        for name in score:
            score[name] += rejection_scores(clf, f, name).tolist()
    f_oos = learner.features(oos)
    oos_score = {name: rejection_scores(clf, f_oos, name) for name in score}

    def at(t: float, name: str = own) -> dict:
        kept = sum(o and b >= t for o, b in zip(ok, score[name])) / len(ok)
        return {
            "acc_reject": kept,
            "oos_recall": float((oos_score[name] < t).double().mean()),
            "threshold": t,
        }

    out = {"acc": sum(ok) / len(ok), **at(clf.threshold())}
    out["by_accept"] = {str(a): at(threshold(clf.counts, a)) for a in ACCEPTS}
    if other_counts is not None:
        out[other] = {str(a): at(threshold(other_counts, a), other) for a in ACCEPTS}
    return out


def rejection_scores(clf, feats, score: str):
    """Each row's rejection score: "cosine", the fit (what --reject thresholds); "top", the top ridge score."""
    return clf.fits(feats) if score == "cosine" else clf.scores(feats).max(1).values


def other_counts_of(clf, feats, labels):
    """The other score's calibration histogram for a task's training rows just after its fit, made as the
    classifier makes its own (pmserve.rejection.calibration_counts)."""
    from pmserve.rejection import calibration_counts

    h, y = clf.project(feats), clf._targets(labels)
    return calibration_counts(h, y, clf.G, clf.lam, clf.W, clf.Q, OTHER[clf.reject_score])


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
            other_counts = zeros(BINS, dtype=float64)  # the other score's calibration histogram

            def on_task(
                i: int,
                learner,
                tasks=tasks,
                per_task=per_task,
                method=method,
                seed=seed,
                label=label,
                other_counts=other_counts,
            ) -> None:
                seen = tasks if method == "joint" else tasks[: i + 1]
                clf = next(iter(learner.classifiers.values()))
                for t in seen if method == "joint" else seen[-1:]:
                    other_counts += other_counts_of(clf, learner.features(t.train), t.train.labels)
                per_task.append({"task": i, **measure(learner, [t.test for t in seen], oos, other_counts)})
                if "clinc150" in args.data:
                    known = {y for t in seen for y in t.classes}
                    val_known = split([r for r in val if r.intent in known])
                    per_task[-1]["val"] = measure(learner, [val_known], oos_val, other_counts)
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
            clf_meta = json.loads((out / "state" / "classifier.json").read_text())
            r["config"]["reject_score"] = clf_meta.get("reject_score", "top")  # before it: the top score
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
