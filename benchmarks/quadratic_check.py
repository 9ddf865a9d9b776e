"""Does the closed form's quadratic model predict what a merge costs? Predicted against measured loss increase.

    python benchmarks/quadratic_check.py /tmp/pmq/wordnet-nouns-pm-s0 --json benchmarks/results/quadratic.json
alpha_t minimises sum_{k<=t} 1/2 (W - theta*_k)^T F_k (W - theta*_k) over the segment from W_hat_{t-1} to theta*_t:
each term is the second-order model of task k's loss increase when the weights move from its optimum theta*_k.
For every merge t and task k <= t of a finished RUN (class-incremental, so task k's training-head rows are final
after task k) this prints
  predicted: 1/2 (W_hat_t - theta*_k)^T F_k (W_hat_t - theta*_k), with the run's own diagonal Fisher files;
  measured:  task k's mean training cross-entropy (over its own classes, its training-head rows: the loss the
             Fisher is of) at W_hat_t minus at theta*_k, on all its training examples.
theta*_k = W_hat_{k-1} + Delta_k (chained), from the run's merged.safetensors and delta.safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pmserve.adapters import set_merged
from pmserve.train import open_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # the final training head: every task's rows as trained on that task
    _, tasks, learner, folders = open_run(args.run)
    merged = [load_file(str(f / "merged.safetensors")) for f in folders]
    deltas = [load_file(str(f / "delta.safetensors")) for f in folders]
    fishers = [load_file(str(f / "fisher.safetensors")) for f in folders]
    alphas = [json.loads((f / "task.json").read_text())["alpha"] for f in folders]
    thetas = [d if k == 0 else {m: merged[k - 1][m] + d[m] for m in d} for k, d in enumerate(deltas)]

    @torch.no_grad()
    def loss(weights: dict[str, torch.Tensor], k: int) -> float:
        set_merged(learner.encoder.model, learner.base, weights)
        task = tasks[k]
        idx = learner.head.index(task.classes)
        logits = learner.head.logits(learner.features(task.train))[:, idx]
        pos = {y: i for i, y in enumerate(task.classes)}
        return float(F.cross_entropy(logits, torch.tensor([pos[y] for y in task.train.labels])))

    at_optimum = [loss(thetas[k], k) for k in range(len(tasks))]
    rows = []
    for t in range(len(tasks)):
        for k in range(t + 1):
            predicted = 0.5 * sum(
                float((fishers[k][m] * (merged[t][m] - thetas[k][m]).pow(2)).sum()) for m in merged[t]
            )
            measured = loss(merged[t], k) - at_optimum[k]
            rows.append(
                {"merge": t, "task": k, "alpha": alphas[t], "predicted": predicted, "measured": measured}
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| after merge t (alpha_t) | task k | predicted increase | measured increase |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['merge']} ({r['alpha']:.3g}) | {r['task']} | {r['predicted']:.3g} | {r['measured']:.3g} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(args.run), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
