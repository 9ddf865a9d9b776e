"""Cost of the Fisher pass's per-sample products: a whole batch at once (the einsum pmserve used until
2026-12-03) against SAMPLES_PER_PRODUCT samples at a time (fisher.add_squared_per_sample_grads), alternated.

    python benchmarks/experiments/fisher_products.py --repeats 4 --json benchmarks/results/fisher_products.json
The whole Fisher pass of task 0 of builtin:wordnet-nouns (Learner._fisher: the defaults' LoRA, sampled labels, 512
samples) with each way of forming the products swapped in, one after the other, --repeats times; the ratio of
medians, and the largest relative difference between the two Fishers (the same sums in another order).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from step_cost import first_nouns_task, machine, report  # noqa: E402

import pmserve.fisher as fisher
from pmserve.adapters import lora_layers
from pmserve.train import TrainConfig


def batch_at_once(total: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """The baseline: every sample's out x in gradient of the batch materialised, then squared and summed."""
    total += torch.einsum("bto,bti->boi", g, x).pow(2).sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    learner, task, w, b = first_nouns_task(TrainConfig.batch_size)
    cfg = learner.cfg
    layers = lora_layers(learner.encoder.model)
    ways = {"batch_at_once": batch_at_once, "in_chunks": fisher.add_squared_per_sample_grads}
    times: dict[str, list[float]] = {k: [] for k in ways}
    fishers = {}
    try:
        for _ in range(args.repeats):
            for name, way in ways.items():
                fisher.add_squared_per_sample_grads = way
                t0 = time.perf_counter()
                fishers[name] = learner._fisher(task, 0, layers, w, b)
                times[name].append(time.perf_counter() - t0)
    finally:
        fisher.add_squared_per_sample_grads = ways["in_chunks"]
    a, c = fishers["batch_at_once"], fishers["in_chunks"]
    out = {
        "machine": machine(),
        "seconds": times,
        "median_batch_at_once": statistics.median(times["batch_at_once"]),
        "median_in_chunks": statistics.median(times["in_chunks"]),
        "ratio_in_chunks_over_batch_at_once": statistics.median(times["in_chunks"])
        / statistics.median(times["batch_at_once"]),
        "max_relative_difference": max(float((a[k] - c[k]).abs().max() / a[k].abs().max()) for k in a),
        "samples": min(cfg.fisher_samples, len(task.train.labels)),
        "samples_per_product": fisher.SAMPLES_PER_PRODUCT,
    }
    report(out, args.json)


if __name__ == "__main__":
    main()
