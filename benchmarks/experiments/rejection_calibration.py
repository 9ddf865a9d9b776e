"""Which calibration rule keeps its promise as tasks accumulate? Frozen MiniLM features (exact for frozen),
CLINC150 default tasks of seed SEED (0); judged on CLINC150's *validation* split (in scope) and oos_val, never test.

    python benchmarks/experiments/rejection_calibration.py [SEED] > benchmarks/results/rejection_calibration-val-sSEED.jsonl

Per task: the share of the in-scope validation accuracy kept and the oos_val recall, for thresholds read from
the leave-one-out histogram of every task so far (pooled, what pmserve does), of tasks decayed by 0.5 per
task, or of the current task only, at acceptance 0.99 and 0.98; and for another score ("cosine", pooled):
the largest cosine between a request's projected features and a class's column of Q (its mean's direction),
calibrated on each task's rows with their own class's column less the row (exact leave-one-out).
"""

import json
import sys

import torch

from pmserve import rejection
from pmserve.backbone import load_encoder, split_features
from pmserve.heads import Ridge
from pmserve.tasks import Split, builtin_tasks, clinc150_records

torch.set_num_threads(1)
tasks = builtin_tasks("builtin:clinc150", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
enc, prep, _ = load_encoder("builtin:minilm", "text", 64)
dev = torch.device("cpu")


def feat(sp):
    return split_features(enc, prep, sp, dev, 128)


val = [r for r in clinc150_records("val")]
oos = [r.text for r in clinc150_records("oos_val")]
F_oos = feat(Split(oos, ["oos"] * len(oos)))
rows = []
clf = Ridge(enc.hidden_size, 2000, 0, None, "gcv", 0.99)
per_task_cos = []  # the top LOO cosines of the same rows (the "cosine" score)
per_task_loo = []  # the top LOO scores of the correct rows of each task, under the classifier of its time
residuals = []  # "rescored": those scores less their class's mean score then (Q_c . W_c / n_c)
n_class = torch.zeros(0, dtype=torch.float64)  # rows per class, for the class means of the projected features


def class_means(clf, n):
    """Each class's mean score over its training rows under the current W: exact and exemplar-free (Q = H^T Y)."""
    return (clf.Q * clf.W).sum(0) / n


for i, t in enumerate(tasks):
    f = feat(t.train)
    clf.fit(f, t.train.labels, seed=0)
    h, y = clf.project(f), clf._targets(t.train.labels)
    loo = rejection.loo_ridge_scores(h, y, clf.G, clf.lam, clf.W)
    top, pred = loo.max(1)
    per_task_loo.append(top[pred == y.argmax(1)])
    per_task_cos.append(rejection.loo_top_cosines(h, y.argmax(1), clf.Q)[pred == y.argmax(1)])
    n_class = torch.cat([n_class, torch.zeros(len(clf.labels) - len(n_class), dtype=torch.float64)])
    n_class += y.sum(0)
    right = pred == y.argmax(1)
    residuals.append(top[right] - class_means(clf, n_class)[pred[right]])
    seen = set(clf.labels)
    vs = [r for r in val if r.intent in seen]
    Fv = feat(Split([r.text for r in vs], [r.intent for r in vs]))
    s = clf.scores(Fv)
    ok = torch.tensor([clf.labels[k] == r.intent for k, r in zip(s.argmax(1).tolist(), vs)])
    best = s.max(1).values
    ob = clf.scores(F_oos).max(1).values
    out = {"task": i, "acc": float(ok.double().mean())}
    for a in (0.99, 0.98):
        for name, d in (("pooled", 1.0), ("decay0.5", 0.5), ("current", 0.0)):
            counts = torch.zeros(rejection.BINS, dtype=torch.float64)
            for j, top_j in enumerate(per_task_loo):
                counts = d * counts + rejection.histogram(top_j) if j else rejection.histogram(top_j)
            th = rejection.threshold(counts, a)
            kept = float((ok & (best >= th)).double().mean()) / out["acc"]
            out[f"{name}@{a}"] = (round(kept, 4), round(float((ob < th).double().mean()), 3))
        # per-class thresholds that follow each class's mean score now: t_c = m_c(now) + the residual quantile
        q = rejection.threshold(sum(rejection.histogram(r) for r in residuals), a)
        t = class_means(clf, n_class) + q
        kept = float((ok & (best >= t[s.argmax(1)])).double().mean()) / out["acc"]
        so = clf.scores(F_oos)
        out[f"rescored@{a}"] = (round(kept, 4), round(float((ob < t[so.argmax(1)]).double().mean()), 3))
        th = rejection.threshold(sum(rejection.histogram(c) for c in per_task_cos), a)
        fv, fo = (rejection.top_cosines(clf.project(x), clf.Q) for x in (Fv, F_oos))
        kept = float((ok & (fv >= th)).double().mean()) / out["acc"]
        out[f"cosine@{a}"] = (round(kept, 4), round(float((fo < th).double().mean()), 3))
    print(json.dumps(out), flush=True)
