"""A RUN that grows one task at a time: its size after each task, and the time of each `pmserve train --add`.

The sequence is the first N tasks of --data (default builtin:wordnet-nouns:tasks=N,classes=2; default model and
options), written out as task folders. Today's pmserve trains task 0 with `pmserve train`, then adds every later task with
`pmserve train --add FOLDER` (one process per task, as a user would run it, model loading included). With
--old-src (a checkout of pmserve before RUN format 2, e.g. `git worktree add /tmp/pm-old e4a4527`) the same
folders are also trained in one go by that version, whose RUN after k tasks is its first k task folders (they
are never rewritten); its alphas and accuracies are compared with the grown RUN's. With --joint, a joint
retraining on all N tasks' data is timed the same way (one process), for the cost of the last --add against it
(issue 36: at most 1/5).

    python benchmarks/experiments/run_growth.py --tasks 10 --old-src /tmp/pm-old --json benchmarks/results/run_growth.json
    python benchmarks/experiments/run_growth.py --data builtin:clinc150:tasks=15,classes=10 --tasks 11 --joint \
        --json benchmarks/results/run_growth_clinc150.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from harness import clean_env, write_json  # noqa: E402

from pmserve.tasks import builtin_tasks, save_split


def size(paths) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def write_folders(spec: str, root: Path, n: int) -> list[Path]:
    folders = []
    for t in builtin_tasks(spec, 0)[:n]:
        d = root / t.name
        d.mkdir(parents=True)
        save_split(t.train, t.kind, d, "train")
        save_split(t.test, t.kind, d, "test")
        folders.append(d)
    return folders


def task_timing(run: Path) -> list[dict]:
    """Each finished task's seconds in the RUN (task.json): all of it, and the evaluation on every test set."""
    infos = [json.loads(t.read_text()) for t in sorted(run.glob("tasks/*/task.json"))]
    return [{"seconds": i["seconds"], "seconds_evaluating": i.get("seconds_evaluating")} for i in infos]


def pmserve(*args, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pmserve", *map(str, args)], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


OLD = """
import sys, json
from pmserve.train import TrainConfig, train
r = train(TrainConfig(data=sys.argv[1]), sys.argv[2], progress=False, log=lambda *a: None)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--data", help="a built-in sequence with at least --tasks tasks (default: wordnet nouns)")
    ap.add_argument("--joint", action="store_true", help="also time a joint retraining on all the tasks")
    ap.add_argument("--old-src", type=Path, help="a pmserve checkout from before RUN format 2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    env = clean_env(PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = args.data or f"builtin:wordnet-nouns:tasks={args.tasks},classes=2"
        folders = write_folders(spec, tmp / "data", args.tasks)
        if len(folders) < args.tasks:
            raise SystemExit(f"--data: {spec} has {len(folders)} tasks, fewer than --tasks {args.tasks}")
        first = tmp / "first"
        first.mkdir()
        (first / folders[0].name).symlink_to(folders[0])
        run = tmp / "run"
        seconds = [pmserve("train", first, "--out", run, "--quiet", env=env)]
        sizes = [size([run])]
        for f in folders[1:]:
            seconds.append(pmserve("train", "--add", f, "--out", run, "--quiet", env=env))
            sizes.append(size([run]))
            print(
                f"after {len(sizes)} tasks: {sizes[-1] / 2**20:.1f} MiB, add took {seconds[-1]:.1f} s",
                flush=True,
            )
        new = json.loads((run / "metrics.json").read_text())
        result = {
            "data": spec,
            "tasks": args.tasks,
            "size_bytes": sizes,
            "seconds": seconds,
            "alphas": new["alphas"],
            "ACC": new["ACC"],
            "task_seconds": task_timing(run),  # inside each process: the rest is start-up and loading
        }
        if args.joint:
            result["joint_seconds"] = pmserve(
                "train", tmp / "data", "--method", "joint", "--out", tmp / "joint", "--quiet", env=env
            )
            result["joint_ACC"] = json.loads((tmp / "joint" / "metrics.json").read_text())["ACC"]
            result["joint_task_seconds"] = task_timing(tmp / "joint")
        if args.old_src:
            old_run = tmp / "old"
            subprocess.run(
                [sys.executable, "-c", OLD, str(tmp / "data"), str(old_run)],
                check=True,
                env={**env, "PYTHONPATH": str(args.old_src)},
                cwd=tmp,  # not this checkout: `python -c` puts the working directory first on sys.path
            )
            old = json.loads((old_run / "metrics.json").read_text())
            assert not (old_run / "plan.json").exists(), "the old checkout did not run"
            tasks = sorted((old_run / "tasks").iterdir())
            base = [old_run / "config.json"]
            result["old_size_bytes"] = [size(base + tasks[: k + 1]) for k in range(len(tasks))]
            result["old_alphas"] = old["alphas"]
            result["max_alpha_diff"] = max(
                abs(a - b) for a, b in zip(old["alphas"], new["alphas"]) if a is not None
            )
            diffs = [
                abs(a - b)
                for h in old["by_head"]
                for ra, rb in zip(old["by_head"][h]["acc_matrix"], new["by_head"][h]["acc_matrix"])
                for a, b in zip(ra, rb)
            ]
            result["max_acc_diff"] = max(diffs)
    s = result["size_bytes"]
    print(
        f"size after 1 / 5 / {args.tasks} tasks: " + " / ".join(f"{s[k] / 2**20:.1f} MiB" for k in (0, 4, -1))
    )
    print(f"ratio after 5 / after 1: {s[4] / s[0]:.3f}; after {args.tasks} / after 1: {s[-1] / s[0]:.3f}")
    print(
        f"seconds per added task: median {sorted(result['seconds'][1:])[len(result['seconds'][1:]) // 2]:.1f}"
    )
    if "joint_seconds" in result:
        print(
            f"last --add {result['seconds'][-1]:.1f} s, joint retraining on all {args.tasks} tasks "
            f"{result['joint_seconds']:.1f} s: ratio {result['seconds'][-1] / result['joint_seconds']:.3f}"
        )
        add, joint = result["task_seconds"][-1], result["joint_task_seconds"][0]
        print(
            "inside the processes, without evaluation: last --add "
            f"{add['seconds'] - add['seconds_evaluating']:.1f} s, joint "
            f"{joint['seconds'] - joint['seconds_evaluating']:.1f} s; evaluation {add['seconds_evaluating']:.1f} s "
            f"and {joint['seconds_evaluating']:.1f} s"
        )
    if "old_size_bytes" in result:
        o = result["old_size_bytes"]
        print("before (format 1): " + " / ".join(f"{o[k] / 2**20:.1f} MiB" for k in (0, 4, -1)))
        print(
            f"max |alpha diff| {result['max_alpha_diff']:.2e}, max |accuracy diff| {result['max_acc_diff']:.2e}"
        )
    if args.json:
        write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()
