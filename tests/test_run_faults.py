"""Fault injection: `pmserve train --add` killed with SIGKILL (at each named step of a task's commit, and at
random moments), then the same command run again, ends with a RUN identical to one that was never killed: the
same alphas and accuracy matrix, the same merged weights and adapters, bitwise.

PMSERVE_FAULTS=N sets how many random moments (3 by default, to keep CI short); BENCHMARKS.md's RELIABILITY
figure ran 50. Each kill runs in a process of its own, from a copy of one finished 1-task RUN."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_tasks
from tests.test_add import GROUPS, QUIET, config

# Runs `pmserve ARGV...` in this process, dying with SIGKILL at the Nth call of one named step.
DRIVER = r"""
import os, signal, sys
from pathlib import Path
import pmserve.files as files
from pmserve.formats import run as run_files
import pmserve.train as train_module

step, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def die_on(owner, name, when=lambda *a, **k: True):
    real = getattr(owner, name)
    def wrapped(*a, **k):
        if when(*a, **k):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(owner, name, wrapped)

if step == "plan":  # before the grown plan is written
    die_on(run_files, "write_plan")
elif step == "task-complete":  # a task folder written whole, not yet renamed into tasks/
    die_on(files, "fsync_tree")
elif step == "state-written":  # the next state written whole beside the old one
    die_on(run_files, "fsync_tree")
elif step == "task-in-place":  # the task folder renamed into place, its state not yet swapped in
    die_on(run_files, "promote_state")
elif step == "between-renames":  # inside the swap: the old state moved aside, the new one not yet in place
    real_promote, real_rename = run_files.promote_state, os.rename
    inside = [False]
    def promote(run):
        inside[0] = True
        try:
            return real_promote(run)
        finally:
            inside[0] = False
    def rename(src, dst, *a, **k):
        if inside[0] and str(src).endswith(".state-next"):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *a, **k)
    run_files.promote_state, os.rename = promote, rename
elif step == "metrics":  # every task done, metrics.json not yet written
    die_on(train_module, "write_json", lambda path, obj: Path(path).name == "metrics.json")
from pmserve.cli.main import main
sys.argv = ["pmserve", *argv]
sys.exit(main())
"""
STEPS = [
    ("plan", 1),
    ("task-complete", 2),
    ("state-written", 1),
    ("task-in-place", 2),
    ("between-renames", 1),
]
STEPS += [("between-renames", 2), ("metrics", 1)]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def setting(tiny_model, tmp_path_factory):
    """(a finished 1-task RUN to copy, the --add command's arguments, the RUN one uninterrupted --add makes)."""
    root = tmp_path_factory.mktemp("faults")
    data = write_tasks(root / "data", GROUPS[:1], 8, 4)
    more = write_tasks(root / "more", GROUPS[1:3], 8, 4, seed=3)
    from pmserve.train import train

    base = root / "base"
    train(config(data, tiny_model), base, **QUIET)
    args = ["train", "--add", str(more / "t0"), "--add", str(more / "t1"), "--out"]
    ref = root / "ref"
    shutil.copytree(base, ref)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pmserve", *args, str(ref)], capture_output=True, env=ENV)
    assert res.returncode == 0, res.stderr
    return base, args, ref, time.perf_counter() - start


def outcome(run: Path) -> dict:
    """What a RUN computed, without the wall-clock times it recorded and its own path (model cards name it).
    PEFT writes adapter_config.json's target_modules from a set, in an order that varies by process."""
    m = json.loads((run / "metrics.json").read_text())
    out = {k: m[k] for k in ("alphas", "acc_matrix", "by_head", "ridge_lambdas", "tasks")}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.is_file() and not rel.startswith(".") and p.name not in ("metrics.json", "task.json"):
            out[rel] = p.read_bytes().replace(str(run).encode(), b"RUN")
            if p.name == "adapter_config.json":
                cfg = json.loads(out[rel])
                out[rel] = {**cfg, "target_modules": sorted(cfg["target_modules"])}
    for p in sorted(run.glob("tasks/*/task.json")):
        info = json.loads(p.read_text())
        clock = ("seconds", "seconds_evaluating", "timing")  # wall-clock times
        out[str(p.relative_to(run))] = {k: v for k, v in info.items() if k not in clock}
    return out


def killed_then_retried(setting, tmp_path, how: list[str] | float) -> dict:
    """Kill the --add (at a named step, or after `how` seconds), then run the same command again, which must
    succeed; the RUN's outcome."""
    base, args, _, _ = setting
    run = tmp_path / "run"
    shutil.copytree(base, run)
    if isinstance(how, list):
        # from tmp_path: `-c` puts the working directory first on sys.path, and the checkout's kernels/
        # would hide the PyPI package that transformers imports
        first = subprocess.run(
            [sys.executable, "-c", DRIVER, *how, *args, str(run)], capture_output=True, env=ENV, cwd=tmp_path
        )
        assert first.returncode == -signal.SIGKILL, (how, first.returncode, first.stderr[-2000:])
    else:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pmserve", *args, str(run)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(how)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    retry = subprocess.run([sys.executable, "-m", "pmserve", *args, str(run)], capture_output=True, env=ENV)
    assert retry.returncode == 0, retry.stderr[-2000:]
    return outcome(run)


@pytest.mark.parametrize("step,nth", STEPS, ids=[f"{s}-{n}" for s, n in STEPS])
def test_a_kill_at_a_named_step_then_the_same_command(setting, tmp_path, step, nth):
    got = killed_then_retried(setting, tmp_path, [step, str(nth)])
    assert got == outcome(setting[2])


def test_kills_at_random_moments_then_the_same_command(setting, tmp_path):
    rng = random.Random(0)
    seconds = setting[3]
    for k in range(int(os.environ.get("PMSERVE_FAULTS", "3"))):
        when = rng.uniform(0, seconds)
        got = killed_then_retried(setting, tmp_path / str(k), when)
        assert got == outcome(setting[2]), f"killed after {when:.2f} s"
