"""Does the closed form's quadratic model predict what a merge costs? Predicted against measured loss increase.

    python benchmarks/experiments/quadratic_check.py /tmp/pmq/i17-nouns-pm-s0 --json benchmarks/results/quadratic.json
alpha_t minimises sum_{k<=t} 1/2 (W - theta*_k)^T F_k (W - theta*_k) over the segment from W_hat_{t-1} to theta*_t:
each term is the second-order model of task k's loss increase when the weights move from its optimum theta*_k.
For every merge t and task k <= t of a finished RUN (class-incremental, so task k's training-head rows are final
after task k) this prints
  predicted: 1/2 (W_hat_t - theta*_k)^T F_k (W_hat_t - theta*_k) with F_k the paper's diagonal Fisher, taken
             again here exactly as training took it (same samples, labels and head), and, for a run with
             --curvature profile, with F_k scaled as the run scaled it (task.json's fisher_scale);
  measured:  task k's mean training cross-entropy (over its own classes, its training-head rows: the loss the
             Fisher is of) at W_hat_t minus at theta*_k, on all its training examples.
theta*_k = W_hat_{k-1} + Delta_k (chained), rebuilt from the RUN's adapters and recorded alphas.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from harness import run_args, write_json  # noqa: E402

from pmserve.adapters import set_merged
from pmserve.formats.peft import read_adapter
from pmserve.merging.recurrence import chained_merge, chained_theta
from pmserve.task_fisher import find_linears
from pmserve.train import open_run


def main() -> None:
    args = run_args(__doc__)
    # the final training head: every task's rows as trained on that task
    _, tasks, learner, folders = open_run(args.run)
    infos = [json.loads((f / "task.json").read_text()) for f in folders]
    alphas = [i["alpha"] for i in infos]
    scales = [(i.get("curvature") or {}).get("fisher_scale") for i in infos]
    deltas = [{m: read_adapter(f).delta(m) for m in learner.names} for f in folders]
    merged, thetas, prev = [], [], {}
    for d, a in zip(deltas, alphas):
        thetas.append(chained_theta(prev, d))
        prev = chained_merge(prev, d, a)
        merged.append(prev)
    model = learner.encoder.model
    layers = find_linears(model, learner.names)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)

    def head_of(k: int):
        idx = learner.head.index(tasks[k].classes)
        return lambda feats: learner.head.logits(feats)[:, idx]

    def fisher(k: int) -> dict[str, torch.Tensor]:
        """F_k as training took it (Learner._fisher): at theta*_k, with task k's head rows."""
        set_merged(model, learner.base, thetas[k])
        return learner._fisher(tasks[k], k, layers, *learner.head.rows(tasks[k].classes))

    @torch.no_grad()
    def loss(weights: dict[str, torch.Tensor], k: int) -> float:
        set_merged(model, learner.base, weights)
        task = tasks[k]
        logits = head_of(k)(learner.features(task.train))
        pos = {y: i for i, y in enumerate(task.classes)}
        return float(F.cross_entropy(logits, torch.tensor([pos[y] for y in task.train.labels])))

    fishers = [fisher(k) for k in range(len(tasks))]
    at_optimum = [loss(thetas[k], k) for k in range(len(tasks))]
    rows = []
    for t in range(len(tasks)):
        for k in range(t + 1):
            paper = 0.5 * sum(
                float((fishers[k][m] * (merged[t][m] - thetas[k][m]).pow(2)).sum()) for m in merged[t]
            )
            measured = loss(merged[t], k) - at_optimum[k]
            row = {"merge": t, "task": k, "alpha": alphas[t], "paper": paper, "measured": measured}
            if scales[k] is not None:
                row["profile"] = paper * scales[k]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| after merge t (alpha_t) | task k | paper's Fisher predicts | profile predicts | measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        prof = f"{r['profile']:.3g}" if "profile" in r else "-"
        print(
            f"| {r['merge']} ({r['alpha']:.3g}) | {r['task']} | {r['paper']:.3g} | {prof} | {r['measured']:.3g} |"
        )
    if args.json:
        write_json(args.json, {"run": str(args.run), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
