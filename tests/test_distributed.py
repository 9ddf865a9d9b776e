"""`pmserve train --nproc 2`: two gloo ranks on the CPU take the steps one process takes with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pmserve.train import TrainConfig, train
from tests.conftest import write_tasks

# 3 classes x 15 examples: 45 per task, so the last batch of 10 splits unevenly (3 + 2), and so do the Fisher's
OPTIONS = dict(
    epochs=3,
    batch_size=10,
    rank=2,
    fisher_samples=15,
    seed=1,
    lr=3e-2,
    head_lr=5e-2,
    head="linear",
    eval_heads=["prototype", "ridge"],
    ridge_dim=64,
    perturb_per="sample",
    fisher_labels="sampled",
)


def cli(data, model, out, *extra):
    argv = [sys.executable, "-m", "pmserve", "train", str(data), "--model", str(model), "--out", str(out)]
    for k, v in OPTIONS.items():
        argv += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*argv, "--quiet", *extra], capture_output=True, text=True, env=env, timeout=300)
    if "(exit code -6)" in proc.stderr and "--nproc" in extra:
        # A rare abort of a gloo rank ("terminate called without an active exception": once in about 20
        # launches on a loaded 2-core machine, cause not yet found; see the closing note of stop 12) gets one
        # more launch, from scratch or resuming as the call asked. Any other failure fails the test.
        if "--resume" not in extra:
            shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run(
            [*argv, "--quiet", *extra], capture_output=True, text=True, env=env, timeout=300
        )
    return proc


def files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_two_ranks_give_one_process_results_and_resume(tiny_model, tmp_path):
    both = write_tasks(tmp_path / "both", [["animal", "food", "tool"], ["place", "time", "feeling"]], 15, 6)
    data = tmp_path / "data"
    data.mkdir()
    shutil.move(both / "t0", data / "t0")
    # the state a two-rank run killed during task 2 leaves: that of the same run after task 1
    cut = tmp_path / "cut"
    proc = cli(data, tiny_model, cut, "--nproc", "2", "--keep-fisher")
    assert proc.returncode == 0, proc.stderr
    shutil.move(both / "t1", data / "t1")

    one = train(
        TrainConfig(data=str(data), model=str(tiny_model), keep_fisher=True, **OPTIONS),
        tmp_path / "one",
        progress=False,
    )
    run = tmp_path / "two"
    proc = cli(data, tiny_model, run, "--nproc", "2", "--keep-fisher")
    assert proc.returncode == 0, proc.stderr
    two = json.loads((run / "metrics.json").read_text())

    assert two["alphas"] == pytest.approx(one["alphas"], abs=1e-3)
    for h in one["by_head"]:  # within one test example (18 per task)
        for a, b in zip(one["by_head"][h]["acc_matrix"], two["by_head"][h]["acc_matrix"]):
            assert b == pytest.approx(a, abs=1 / 18 + 1e-9), h
    for task in ("00-t0", "01-t1"):
        f1 = load_file(str(tmp_path / "one" / "tasks" / task / "fisher.safetensors"))
        f2 = load_file(str(run / "tasks" / task / "fisher.safetensors"))
        for k in f1:
            # the same sums of float32 squares, added in another order: a shard missing or counted twice is O(1)
            assert ((f1[k] - f2[k]).abs().max() / f1[k].abs().max()).item() < 1e-4, k
    # rank 0 wrote every file, once: the same files as one process (and the plot), nothing temporary
    assert files(run) == sorted([*files(tmp_path / "one"), "acc_matrix.png"])

    # killed during task 2 (the cut run, planned for both tasks, with half a task folder): torchrun with
    # --resume (no DATA, no options: the RUN's own) ends where the full run ended
    shutil.copy(run / "plan.json", cut / "plan.json")
    shutil.copytree(cut / "tasks" / "00-t0", cut / "tasks" / ".01-t1.tmp-999999")
    (cut / "metrics.json").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "pmserve",
        "train",
        "--out",
        str(cut),
        "--nproc",
        "2",
        "--resume",
        "--quiet",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["by_head"] == two["by_head"]
    assert resumed["alphas"] == pytest.approx(two["alphas"], abs=1e-6)
    assert not [p for p in (cut / "tasks").iterdir() if p.name.startswith(".")]


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tiny_tasks, tmp_path):
    proc = cli(tiny_tasks, tmp_path / "no-model", tmp_path / "run", "--nproc", "2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith(f"pmserve: error: rank 1: {tmp_path / 'no-model'}") for line in lines)
    assert lines[-1].startswith("pmserve: error: rank ") and "failed (exit code 2)" in lines[-1]
    assert not (tmp_path / "run").exists()
    # an uneven global batch is refused before any process starts
    proc = cli(tiny_tasks, tmp_path / "no-model", tmp_path / "run", "--nproc", "2", "--batch-size", "7")
    assert proc.stderr.strip() == "pmserve: error: --batch-size: 7 does not split evenly over 2 ranks"


def test_shard_splits_a_global_batch_evenly(monkeypatch):
    from pmserve import distributed

    monkeypatch.setenv("WORLD_SIZE", "3")
    parts = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        parts.append(list(range(8))[distributed.shard(8)])
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7]]
    monkeypatch.setenv("RANK", "2")
    assert list(range(2))[distributed.shard(2)] == []
    with pytest.raises(Exception, match="--batch-size: 8 does not split evenly over 3 ranks"):
        distributed.check_batch(8)
    assert torch.equal(distributed.all_reduce_sum(torch.ones(2)), torch.ones(2))  # no process group: itself
