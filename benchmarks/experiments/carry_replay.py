"""Ridge's drift carry, replayed offline on finished RUNs: one backbone sequence, every carry rule side by side.

    python benchmarks/experiments/carry_replay.py /tmp/pmq/wordnet-nouns-pm-s0 /tmp/pmq/wordnet-nouns-pm-s1 --json out.json
The carry does not change the backbone or the alphas, so a RUN trained with any --ridge-drift holds the whole
backbone sequence (W_hat_t rebuilt from its adapters and recorded alphas). For every task t this computes its
training features under W_hat_{t-1} and W_hat_t, exactly as training does, and replays ridge over the tasks
with each rule: `none` (the stored statistics as they were), `gcv` (the map's mu by GCV on the task's rows),
`class` (mu by leaving one of the task's classes out, "no drift" among the choices), and the oracle that
recomputes every task's statistics under the final backbone (needs the old data). ACC is over every task's
test split under the final backbone, as the run reports it; `none` must reproduce the run's own ridge ACC (and
`class` a run trained with the default --ridge-drift linear). The features are most of the time: --cache DIR
keeps each RUN's, so a new rule can be tried on them in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from harness import write_json  # noqa: E402

from pmserve.adapters import set_merged
from pmserve.formats.peft import read_adapter
from pmserve.heads import Ridge
from pmserve.merging.recurrence import chained_merge
from pmserve.seeds import ridge_seed
from pmserve.train import open_run

RULES = ("none", "gcv", "class", "oracle")


def backbones(learner, folders):
    """Set the learner's model to W_hat_t for t = 0, 1, ..., T in turn (t = 0: the pretrained one), yielding t:
    each W_hat_t from the previous one, the adapters and the recorded alphas, each adapter read once."""
    prev = {}
    for t in range(len(folders) + 1):
        if t > 0:
            alpha = json.loads((folders[t - 1] / "task.json").read_text())["alpha"]
            adapter = read_adapter(folders[t - 1])
            delta = {m: adapter.delta(m) for m in learner.names}
            prev = chained_merge(prev, delta, alpha)
        set_merged(
            learner.encoder.model,
            learner.base,
            {n: prev.get(n, torch.zeros_like(w)) for n, w in learner.base.items()},
        )
        yield t


def backbone_features(tasks, learner, folders) -> tuple[list[torch.Tensor], ...]:
    """Every task's training rows under W_hat_{t-1} and W_hat_t, and every task's rows under the final W_hat."""
    T = len(tasks)
    before, after = [None] * T, [None] * T
    for t in backbones(learner, folders):
        if t < T:
            before[t] = learner.features(tasks[t].train)
        if t > 0:
            after[t - 1] = learner.features(tasks[t - 1].train)
    final = [learner.features(task.train) for task in tasks]
    tests = [learner.features(task.test) for task in tasks]
    return before, after, final, tests


def replay(run: Path, cache: Path | None = None) -> dict:
    cfg, tasks, learner, folders = open_run(run)
    if cache is not None and cache.exists():
        before, after, final, tests = torch.load(cache)
    else:
        before, after, final, tests = backbone_features(tasks, learner, folders)
        if cache is not None:
            torch.save((before, after, final, tests), cache)
    dim = learner.encoder.hidden_size
    out = {"run": str(run), "tasks": len(tasks)}
    for rule in RULES:
        clf = Ridge(dim, cfg.ridge_dim, cfg.seed, cfg.ridge_lambda or None, cfg.ridge_select)
        for t, task in enumerate(tasks):
            if rule in ("gcv", "class") and t > 0:
                clf.carry(before[t], after[t], task.train.labels if rule == "class" else None)
            x = final[t] if rule == "oracle" else after[t]
            clf.fit(x, task.train.labels, seed=ridge_seed(cfg.seed, t))
        accs = []
        for k, task in enumerate(tasks):
            pred = [clf.labels[i] for i in clf.scores(tests[k]).argmax(1).tolist()]
            accs.append(sum(p == y for p, y in zip(pred, task.test.labels)) / len(pred))
        out[rule] = sum(accs) / len(accs)
    by_head = json.loads((run / "metrics.json").read_text()).get("by_head", {})
    out["run_reported"] = by_head.get("ridge", {}).get("ACC")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--cache", type=Path, default=None, help="a folder for each RUN's features (reused if there)"
    )
    args = ap.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        cache = args.cache / f"{run.name}.pt" if args.cache else None
        rows.append(replay(run, cache))
        r = rows[-1]
        print(
            f"{run.name}: " + ", ".join(f"{k} {r[k]:.4f}" for k in RULES) + f" (run says {r['run_reported']})"
        )
        if args.json:
            write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    main()
