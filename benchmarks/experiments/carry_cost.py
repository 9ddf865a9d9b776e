"""Cost of --ridge-drift linear per task, timed on a finished RUN's last task against that task's recorded wall
time (training, Fisher, profile): the task's features under the backbone before it (the one extra forward pass
training makes) and Ridge.carry from those to its features under the merged model, with the task's labels
(the default rule: the map's mu by leaving a class out, "no drift" among the choices).

    python benchmarks/experiments/carry_cost.py RUN [--json F]

The backbones are rebuilt from the RUN's adapters and alphas (benchmarks/experiments/carry_replay.py). The carry is timed on
copies of the RUN's final ridge statistics: the same size as when the last task was carried (dim x dim).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from carry_replay import backbones
from harness import write_json  # noqa: E402

from pmserve.heads import Ridge
from pmserve.train import open_run

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("run", type=Path)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--json", default=None)
args = ap.parse_args()
cfg, tasks, learner, folders = open_run(args.run)
task, T = tasks[-1], len(tasks)
ridge = next(c for c in learner.classifiers.values() if isinstance(c, Ridge))
fw, cr = [], []
for t in backbones(learner, folders):
    if t == T - 1:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            before = learner.features(task.train)
            fw.append(time.perf_counter() - t0)
    elif t == T:
        after = learner.features(task.train)
for _ in range(args.repeats):
    r = copy.deepcopy(ridge)
    t0 = time.perf_counter()
    mu = r.carry(before, after, task.train.labels)
    cr.append(time.perf_counter() - t0)
secs = json.loads((folders[-1] / "task.json").read_text())["seconds"]
out = {
    "run": str(args.run),
    "task": T - 1,
    "rows": len(task.train.labels),
    "mu": mu,  # None: the rows said "no drift" and the statistics stayed as they were
    "forward_s": statistics.median(fw),
    "carry_s": statistics.median(cr),
    "task_s": secs,
    "threads": torch.get_num_threads(),
}
out["share"] = (out["forward_s"] + out["carry_s"]) / secs
print(json.dumps(out))
if args.json:
    write_json(args.json, out, indent=None)
