"""One task trained with the fused Triton kernel against the PyTorch path, on a GPU: steps/s and the loss curve.

Two checks, each a run of `Learner.train_task` (what `pmserve train` runs per task) on task 0 of the data:
- same loss curve: method merge (eps 0: nothing is perturbed, so the two paths compute the same steps up to
  rounding), --kernel torch and --kernel triton from the same seed; the max |loss difference| per step;
- speed: method pm (eps 0.5, s drawn per step: in-kernel for triton, PyTorch's generator for torch), the training
  loop's steps per second (Fisher and evaluation excluded), the two kernels alternated, median of `--repeats`.

Without CUDA it writes {"skipped": reason} and exits 0.

    python benchmarks/gpu_train_check.py --model MODEL_DIR --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


class Recorder:
    """The progress interface train_task reports to (pmserve.progress.TrainProgress), keeping every loss."""

    def __init__(self):
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, loss) -> None:
        self.losses.append(loss.item())  # a sync per step on both paths alike
        self.times.append(time.perf_counter())

    def epoch_done(self, epoch: int, epochs: int) -> None:
        pass


def run(model: str, data: str, method: str, kernel: str, epochs: int, batch: int) -> Recorder:
    import torch

    from pmserve.backbone import load_encoder
    from pmserve.learner import Learner, TrainConfig
    from pmserve.tasks import load_tasks

    cfg = TrainConfig(
        data=data, model=model, method=method, kernel=kernel, device="cuda", epochs=epochs, batch_size=batch
    )
    task = load_tasks(data, cfg.seed)[0]
    encoder, prep, _ = load_encoder(cfg.model, task.kind, cfg.max_length)
    learner = Learner(cfg, encoder, prep, torch.device("cuda"))
    rec = Recorder()
    learner.train_task(task, 0, epochs, rec)
    torch.cuda.synchronize()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--data", default="builtin:wordnet-nouns:tasks=1,classes=4")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        out = {"skipped": "no CUDA device"}
    else:
        from pmserve.perturb import use_fused_kernel  # noqa: F401 -- fails here, not mid-run, without Triton

        same = {
            k: run(args.model, args.data, "merge", k, 2, args.batch_size).losses for k in ("torch", "triton")
        }
        diffs = [abs(a - b) for a, b in zip(same["torch"], same["triton"])]
        speed: dict[str, list[float]] = {"torch": [], "triton": []}
        for _ in range(args.repeats):
            for k in ("torch", "triton"):
                rec = run(args.model, args.data, "pm", k, args.epochs, args.batch_size)
                warm = len(rec.times) // 5  # the first steps compile kernels and warm caches
                speed[k].append((len(rec.times) - warm - 1) / (rec.times[-1] - rec.times[warm]))
        out = {
            "device": torch.cuda.get_device_name(),
            "model": args.model,
            "data": args.data,
            "batch_size": args.batch_size,
            "loss_curve": {
                "steps": len(diffs),
                "max_abs_diff": max(diffs),
                "first_losses": {k: v[:5] for k, v in same.items()},
                "last_losses": {k: v[-5:] for k, v in same.items()},
            },
            "steps_per_s": {k: statistics.median(v) for k, v in speed.items()},
            "steps_per_s_runs": speed,
            "triton_over_torch": statistics.median(speed["triton"]) / statistics.median(speed["torch"]),
        }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
