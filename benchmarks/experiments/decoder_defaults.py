"""Choosing a decoder run's lr, epochs and batch size (issue 35) on training data only: builtin:clinc150-gen's first task
(--seed, default 0; 30 requests per intent), its training requests split into 25 to train on and 5 held out per
intent; SmolLM2-135M with a fresh LoRA (the decoder defaults otherwise) trained with P&M's perturbation, then the exact
match and the NLL on the held-out requests. The test requests are never read.

    python benchmarks/experiments/decoder_defaults.py --json benchmarks/results/decoder_defaults.json
    python benchmarks/experiments/decoder_defaults.py --grid 1e-3:2:16 --seed 1   # lr:epochs[:batch size]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (harness), never the repo root
from harness import write_json  # noqa: E402

from pmserve.learner import TrainConfig  # noqa: E402
from pmserve.lm_learner import DecoderLearner, decoder_config, load_decoder  # noqa: E402
from pmserve.progress import TrainProgress  # noqa: E402
from pmserve.tasks import Split, Task, builtin_tasks  # noqa: E402


def held_out(task: Task, per_intent: int) -> tuple[Task, Split]:
    """The task with its training split less the last `per_intent` requests of each intent, and those."""
    seen: dict[str, int] = {}
    count = {y: task.train.labels.count(y) for y in task.classes}
    keep, val = Split([], []), Split([], [])
    for x, y in zip(task.train.inputs, task.train.labels):
        seen[y] = seen.get(y, 0) + 1
        part = val if seen[y] > count[y] - per_intent else keep
        part.inputs.append(x)
        part.labels.append(y)
    return Task(task.name, task.kind, keep, Split([], []), task.classes), val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="5e-4:1,1e-3:1,5e-4:2", help="lr:epochs[:batch size], comma-separated")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="which domain comes first, and the training's shuffle and LoRA start",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    task, val = held_out(builtin_tasks("builtin:clinc150-gen:tasks=1,train=30", args.seed)[0], 5)
    rows = []
    for pair in args.grid.split(","):
        lr, epochs, *batch = pair.split(":")
        lr, epochs = float(lr), int(epochs)
        size = {"batch_size": int(batch[0])} if batch else {}
        cfg = decoder_config(
            TrainConfig(
                data="x",
                model="builtin:smollm2",
                lr=lr,
                epochs=epochs,
                seed=args.seed,
                **size,
                given={"lr", "epochs", *size},
            )
        )
        # pm's steps (the perturbation); the Fisher and profile do not change the first task's model: keep them short
        cfg.curvature, cfg.fisher_samples = "fisher", 1
        dec, fmt, _ = load_decoder(cfg.model, cfg.max_length)
        learner = DecoderLearner(cfg, dec, fmt, torch.device("cpu"))
        t0 = time.perf_counter()
        with TrainProgress(1, "off") as bar:
            peft_model, *_ = learner.train_task(task, 0, epochs, bar)
        seconds = time.perf_counter() - t0
        learner.encoder.model = peft_model  # evaluate with the task's adapter (alpha_1 = 1: the merged model)
        m = learner.accuracy(val)
        rows.append(
            {
                "lr": lr,
                "epochs": epochs,
                "batch_size": cfg.batch_size,
                "val_exact": m["exact"],
                "val_nll": m["nll"],
                "seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "seed": args.seed,
        "task": task.name,
        "train": len(task.train.labels),
        "validation": len(val.labels),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
