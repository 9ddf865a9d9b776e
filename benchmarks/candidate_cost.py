"""What checking a candidate version in a child process first costs (issue 37): a repository version's load with the
child's check (pmserve.serving.candidate, then every check in process) against the in-process load alone.

    python benchmarks/candidate_cost.py BUNDLE [--repeats 5] [--out benchmarks/results/candidate_cost.json]

BUNDLE is copied to a one-model repository REPO/m/1; each repeat times `Repository._load` (what a poll or a load
request runs in a worker thread) and `load_bundle` alone on it, alternating, with the next child already started
(as in a serving repository). Reported: median and max seconds of each, and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "candidate_cost.json")
    args = ap.parse_args()

    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle
    from pmserve.serving.repository import Repository

    cfg = ServeConfig(provider="cpu", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(args.bundle, Path(tmp) / "m" / "1")
        repo = Repository(Path(tmp), cfg, log=lambda *_: None)
        repo.load_all()  # the first child starts cold; the next one waits warm, as while serving
        child, alone = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            served, _, _ = repo._load("m", 1)
            child.append(time.perf_counter() - t)
            assert not isinstance(served, str), served
            t = time.perf_counter()
            load_bundle(Path(tmp) / "m" / "1", "m", cfg, "1")
            alone.append(time.perf_counter() - t)
        repo.prober.close()
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}",
        "command": " ".join(sys.argv),
        "bundle_mib": round(sum(p.stat().st_size for p in args.bundle.rglob("*") if p.is_file()) / 2**20, 1),
        "load_with_child_s": {"median": round(statistics.median(child), 3), "max": round(max(child), 3)},
        "load_in_process_s": {"median": round(statistics.median(alone), 3), "max": round(max(alone), 3)},
        "child_cost_s": round(statistics.median(child) - statistics.median(alone), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
