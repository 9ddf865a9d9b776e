"""One task trained with the fused Triton kernel against the PyTorch path, on a GPU: steps/s and the loss curve.

Two checks, each a run of `Learner.train_task` (what `pmserve train` runs per task) on task 0 of the data:
- same loss curve: method merge (eps 0: nothing is perturbed, so the two paths compute the same steps up to
  rounding), --kernel torch and --kernel triton from the same seed; the max |loss difference| per step;
- speed: method pm (eps 0.5, s drawn per step: in-kernel for triton, PyTorch's generator for torch), the training
  loop's steps per second (Fisher and evaluation excluded), the two kernels alternated, median of `--repeats`.

Without CUDA it writes {"skipped": reason} and exits 0. `--dry-run` runs both checks on the CPU instead, through
Triton's interpreter, with a tiny random BERT (MiniLM's tokenizer and config, 2 layers of width 32; --model is
ignored) on a tiny slice of the data, one epoch, one repeat: it tries the code path that benchmarks/gpu_check.sh
runs on a GPU; its steps/s mean nothing.

    python benchmarks/gpu_train_check.py --model MODEL_DIR --json out.json
    python benchmarks/gpu_train_check.py --dry-run --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(
    model: str, data: str, method: str, kernel: str, epochs: int, batch: int, device: str = "cuda"
) -> Recorder:
    import torch

    from pmserve.backbone import load_encoder
    from pmserve.learner import Learner, TrainConfig
    from pmserve.tasks import load_tasks

    cfg = TrainConfig(
        data=data, model=model, method=method, kernel=kernel, device=device, epochs=epochs, batch_size=batch
    )
    task = load_tasks(data, cfg.seed)[0]
    encoder, prep, _ = load_encoder(cfg.model, task.kind, cfg.max_length)
    learner = Learner(cfg, encoder, prep, torch.device(device))
    rec = Recorder()
    learner.train_task(task, 0, epochs, rec)
    if device == "cuda":
        torch.cuda.synchronize()
    return rec


def tiny_model(folder: Path) -> str:
    """A random 2-layer BERT of width 32 with MiniLM's tokenizer, saved in `folder` (for --dry-run)."""
    import shutil

    from transformers import AutoConfig, BertModel

    from pmserve.backbone import resolve_model

    minilm = resolve_model("builtin:minilm")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    config = AutoConfig.from_pretrained(str(minilm))
    config.update(
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--data", default="builtin:wordnet-nouns:tasks=1,classes=4")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, Triton interpreter, tiny data: try the code path"
    )
    args = ap.parse_args()
    device = "cuda"
    same_epochs = 2
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        device, same_epochs = "cpu", 1
        args.data = "builtin:wordnet-nouns:tasks=1,classes=2,train=8,test=4"
        args.epochs, args.repeats, args.batch_size = 1, 1, 8
    import tempfile

    import torch

    tmp = tempfile.TemporaryDirectory()
    if args.dry_run:
        args.model = tiny_model(Path(tmp.name) / "tiny-bert")
    if device == "cuda" and not torch.cuda.is_available():
        out = {"skipped": "no CUDA device"}
    else:
        from pmserve.perturb import use_fused_kernel  # noqa: F401 -- fails here, not mid-run, without Triton

        same = {
            k: run(args.model, args.data, "merge", k, same_epochs, args.batch_size, device).losses
            for k in ("torch", "triton")
        }
        diffs = [abs(a - b) for a, b in zip(same["torch"], same["triton"])]
        speed: dict[str, list[float]] = {"torch": [], "triton": []}
        for _ in range(args.repeats):
            for k in ("torch", "triton"):
                rec = run(args.model, args.data, "pm", k, args.epochs, args.batch_size, device)
                warm = len(rec.times) // 5  # the first steps compile kernels and warm caches
                speed[k].append((len(rec.times) - warm - 1) / (rec.times[-1] - rec.times[warm]))
        out = {
            "device": torch.cuda.get_device_name()
            if device == "cuda"
            else "cpu (dry run: Triton interpreter)",
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
