"""`pmserve merge --method ties` (or another --method) against pmserve's own avg (`--method linear`, weights 1/N)
on mergekit_bench's synthetic Llama-style inputs (issue 18's "ties at most 2x avg"); no mergekit needed.

Inputs: mergekit_bench.build_base / build_adapters into --work (built once; --size-mb 1000: a 1.08 GB bf16 base,
rank-16 fp32 adapters on q/k/v/o/gate/up/down). For each adapter count, --pairs rounds of: the method, then linear,
each `python -m pmserve merge a0 .. aN --base BASE --method M --format full --out OUT` in its own process, timed
whole (start-up and imports included, as a user sees it). With --vs-src DIR each round also runs the method from
another source tree (PYTHONPATH=DIR, e.g. a git worktree of an older commit) first: before/after pairs.
Prints per-round ratios and their medians; writes --json.

    .venv/bin/python benchmarks/experiments/ties_vs_avg.py --adapters 4 10 --pairs 5 --json benchmarks/results/ties_vs_avg.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
import mergekit_bench as mb  # noqa: E402
from harness import RESULTS, clean_env, measure, medians, write_json  # noqa: E402


def timed_merge(adapters: list[Path], base: Path, method: str, out: Path, src: str | None = None) -> float:
    """Wall seconds of one `pmserve merge` process (harness.measure), its output removed after."""
    env = clean_env(PYTHONPATH=src) if src else None
    cmd = [sys.executable, "-m", "pmserve", "merge", *map(str, adapters), "--base", str(base)]
    seconds = measure([*cmd, "--method", method, "--format", "full", "--out", str(out)], env)["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1000)
    ap.add_argument("--adapters", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--method", default="ties", help="the method timed against linear (default ties)")
    ap.add_argument("--vs-src", help="also time the method from this source tree, first in each round")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pmserve-ties-vs-avg")
    ap.add_argument("--json", type=Path, default=RESULTS / "ties_vs_avg.json")
    args = ap.parse_args()
    args.work, args.json = args.work.resolve(), args.json.resolve()  # the merges run from inside --work
    args.vs_src = args.vs_src and str(Path(args.vs_src).resolve())
    shape = mb.shape_for(args.size_mb)
    base = args.work / "base"
    if not (base / "model.safetensors").exists():
        mb.build_base(base, shape)
    have = mb.build_adapters(base, args.work / "adapters", max(args.adapters), shape)  # kept when built
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    # run from the work folder: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    os.chdir(args.work)
    results = []
    for n in args.adapters:
        rounds = []
        for _ in range(args.pairs):
            r = {}
            m = args.method
            if args.vs_src:
                r[f"{m}_vs_src"] = timed_merge(have[:n], base, m, out, args.vs_src)
            r[m] = timed_merge(have[:n], base, m, out)
            r["linear"] = timed_merge(have[:n], base, "linear", out)
            r[f"{m}/linear"] = r[m] / r["linear"]
            if args.vs_src:
                r[f"{m}/{m}_vs_src"] = r[m] / r[f"{m}_vs_src"]
            print(n, {k: round(v, 3) for k, v in r.items()}, flush=True)
            rounds.append(r)
        med = medians(rounds, rounds[0])
        print(n, "medians", {k: round(v, 3) for k, v in med.items()}, flush=True)
        results.append({"adapters": n, "rounds": rounds, "medians": med})
    out = {"size_mb": args.size_mb, "method": args.method, "vs_src": args.vs_src, "results": results}
    write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
