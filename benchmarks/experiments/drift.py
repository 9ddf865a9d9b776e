"""Classifier drift: how far the stored class statistics are from ones recomputed with the final backbone.

    python benchmarks/experiments/drift.py /tmp/pmq/wordnet-nouns-pm-s0
Prototype and ridge statistics of task j were computed with the merged model right after task j. After the
last merge the backbone has moved. This measures, per task, the cosine between the stored and the recomputed
class means, and the final accuracy with the stored statistics against statistics recomputed on all training
data with the final backbone (the oracle that a drift compensation could at best reach; recomputing needs the
old data, which a continual learner does not keep). The run needs --eval-heads prototype,ridge or those heads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from harness import run_args, write_json  # noqa: E402

from pmserve.heads import Prototypes, Ridge
from pmserve.train import open_run


def main() -> None:
    args = run_args(__doc__)
    cfg, tasks, learner, _ = open_run(args.run)
    dim = learner.encoder.hidden_size
    stored = {k: c for k, c in learner.classifiers.items() if isinstance(c, (Prototypes, Ridge))}
    fresh = {
        "prototype": Prototypes(dim),
        "ridge": Ridge(dim, cfg.ridge_dim, cfg.seed),
    }
    per_task = []
    for i, t in enumerate(tasks):
        feats = learner.features(t.train)
        fresh["prototype"].update(feats, t.train.labels)
        fresh["ridge"].fit(feats, t.train.labels, seed=cfg.seed * 31 + i)
        if "prototype" in stored:
            p = stored["prototype"]
            idx = [p.labels.index(y) for y in t.classes]
            new = torch.stack(
                [feats[[k for k, y in enumerate(t.train.labels) if y == c]].mean(0) for c in t.classes]
            )
            cos = F.cosine_similarity(p.means()[idx].float(), new, dim=-1)
            per_task.append({"task": t.name, "cosine_stored_vs_recomputed_mean": float(cos.mean())})
    out = {"run": str(args.run), "per_task": per_task}
    for name, clf in stored.items():
        for label, c in (("stored", clf), ("recomputed", fresh[name])):
            learner.classifiers = {name: c}
            accs = [learner.accuracy(t.test)[name] for t in tasks]
            out[f"{name}_{label}_ACC"] = sum(accs) / len(accs)
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
