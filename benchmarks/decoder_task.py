"""Decoder continual training (issue 35): where one task's time goes, and the RUN's state size.

    python benchmarks/decoder_task.py --tasks 2 --json benchmarks/results/decoder_task.json

Trains `pmserve train builtin:clinc150-gen:tasks=T,train=30 --model builtin:smollm2` (one domain of 15 intents x
30 requests = 450 training examples per task, 5 test requests per intent) with the decoder defaults, and reports
per task: the seconds in steps, the Fisher and the loss profile (the task's training, the 3-minute target), the
steps per second, the seconds evaluating (generation and NLL on every test set so far, apart), alpha, the
exact-match row and the NLL row; and the MB of the RUN's state after each task. --method seq etc. for
comparisons (one seed; a reduced number of tasks: report it as what it is).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from harness import write_json
from step_cost import machine

from pmserve.train import TrainConfig, train


def mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--train", type=int, default=30, help="requests per intent (15 intents per task)")
    ap.add_argument("--test", type=int, help="test requests per intent (default: the built-in's)")
    ap.add_argument("--method", default="pm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="the RUN folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = f"builtin:clinc150-gen:tasks={args.tasks},train={args.train}" + (
        f",test={args.test}" if args.test else ""
    )
    out = Path(args.out or tempfile.mkdtemp(prefix="decoder-task-")) / "run"
    sizes = []

    def log(line: str) -> None:  # after each task: the state it left
        print(line, flush=True)
        if " alpha " in line and (out / "state").is_dir():
            sizes.append(round(mb(out / "state"), 1))

    cfg = TrainConfig(data=data, model="builtin:smollm2", method=args.method, seed=args.seed)
    result = train(cfg, out, progress="lines", log=log)
    tasks = []
    for folder in sorted(p for p in (out / "tasks").iterdir() if p.is_dir()):
        info = json.loads((folder / "task.json").read_text())
        t = info.get("timing") or {}
        steps = info["epochs"] * -(-info["data"]["examples"]["train"] // result["config"]["batch_size"])
        tasks.append(
            {
                "name": info["name"],
                "train_examples": info["data"]["examples"]["train"],
                "seconds_steps": t.get("steps"),
                "steps": steps,
                "steps_per_second": steps / t["steps"] if t.get("steps") else None,
                "seconds_fisher": t.get("fisher"),
                "seconds_profile": t.get("profile"),
                "seconds_training": sum(t.values()),
                "seconds_evaluating": info["seconds_evaluating"],
                "seconds_task": info["seconds"],
                "alpha": info["alpha"],
                "exact": info["acc"]["exact"],
                "nll": info["nll"],
            }
        )
    report = {
        "machine": machine(),
        "command": f"pmserve train {data} --model builtin:smollm2 --method {args.method} --seed {args.seed}",
        "config": {
            k: result["config"][k]
            for k in ("lr", "epochs", "batch_size", "max_length", "rank", "fisher_samples")
        },
        "tasks": tasks,
        "state_mb_after_each_task": sizes,
        "adapter_mb": round(mb(next(p for p in (out / "tasks").iterdir() if p.is_dir())), 1),
        "acc_matrix": result["acc_matrix"],
        "nll_matrix": result["nll_matrix"],
        "ACC": result["ACC"],
        "AAA": result["AAA"],
        "forgetting": result["forgetting"],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(args.json, report, indent=1)


if __name__ == "__main__":
    main()
