"""Cost of --ridge-drift linear per task: the task's features before training (one forward pass) and Ridge.carry,
timed on a finished RUN's last task, against that task's recorded wall time (training, Fisher, profile).

    python benchmarks/carry_cost.py RUN
"""

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pmserve.heads import Ridge
from pmserve.train import open_run

run = Path(sys.argv[1])
cfg, tasks, learner, folders = open_run(run)
task = tasks[-1]
ridge = next(c for c in learner.classifiers.values() if isinstance(c, Ridge))
fw, cr = [], []
for _ in range(3):
    t0 = time.perf_counter()
    feats = learner.features(task.train)
    fw.append(time.perf_counter() - t0)
    r = copy.deepcopy(ridge)
    t0 = time.perf_counter()
    r.carry(feats, feats + 0.01 * torch.randn_like(feats))
    cr.append(time.perf_counter() - t0)
secs = json.loads((folders[-1] / "task.json").read_text())["seconds"]
out = {
    "rows": len(task.train.labels),
    "forward_s": statistics.median(fw),
    "carry_s": statistics.median(cr),
    "task_s": secs,
    "threads": torch.get_num_threads(),
}
out["share"] = (out["forward_s"] + out["carry_s"]) / secs
print(json.dumps(out))
