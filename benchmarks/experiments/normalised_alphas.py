"""What per-task Fisher normalisation would do to P&M's alphas, from a finished RUN's files (issue 6).

    python benchmarks/experiments/normalised_alphas.py RUN [RUN...]

For each RUN (a `pmserve train` folder of pm or merge), the closed-form alphas from its stored Fisher files, as
`pmserve merge` computes them (merging.gram.module_grams / recurrence.gram_alphas), and again with each task's Fisher divided
by its mean over every adapted weight (so only its shape across weights counts, not its scale).
"""

from __future__ import annotations

import argparse

import torch

from pmserve.formats.peft import read_adapter
from pmserve.merging.base import resolve_base
from pmserve.merging.gram import module_grams
from pmserve.merging.inputs import check_inputs, expand_inputs
from pmserve.merging.recurrence import gram_alphas


def alphas(run: str) -> tuple[list[float], list[float], list[float]]:
    """(alphas from the raw Fishers, each task's mean Fisher, alphas from the mean-normalised Fishers)."""
    ads = [read_adapter(p) for p in expand_inputs([run])]
    inputs = check_inputs(ads, resolve_base(None, ads))
    n, kinds = len(ads), [a.kind for a in ads]
    grams = [torch.zeros(n, n, dtype=torch.float64) for _ in range(n)]
    sums, counts = [0.0] * n, [0] * n
    for m in inputs.modules:
        for k, h in module_grams(ads, m, list(range(n))).items():
            grams[k] += h
        for k in range(n):
            f = ads[k].fisher_of(m)
            sums[k] += float(f.double().sum())
            counts[k] += f.numel()
    means = [s / c for s, c in zip(sums, counts)]
    clip = bool((ads[0].run_config or {}).get("clip_alpha", True))
    return (
        gram_alphas(kinds, grams, clip),
        means,
        gram_alphas(kinds, [g / m for g, m in zip(grams, means)], clip),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    print("| run | alphas (raw Fisher) | mean Fisher per task | alphas (normalised Fisher) |")
    print("|---|---|---|---|")
    for run in args.runs:
        raw, means, norm = alphas(run)
        fmt = lambda xs, f: ", ".join(format(x, f) for x in xs)  # noqa: E731
        print(f"| {run} | {fmt(raw, '.3g')} | {fmt(means, '.2g')} | {fmt(norm, '.3g')} |")


if __name__ == "__main__":
    main()
