"""A RUN that grows: `pmserve train --add` appends tasks to a finished RUN from their data alone, and ends where
one run over every task ends; the RUN's size grows only by the per-task files; bad additions change nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmserve.errors import PMError
from pmserve.train import TrainConfig, add_tasks, train
from tests.conftest import write_tasks

GROUPS = [["animal", "food"], ["tool", "place"], ["time", "feeling"], ["animal", "tool"], ["food", "time"]]
QUIET = dict(progress=False, log=lambda *_: None)


def config(data, model, **kw):
    base = dict(
        data=str(data),
        model=str(model),
        epochs=2,
        batch_size=8,
        rank=2,
        fisher_samples=16,
        seed=1,
        lr=3e-2,
        head_lr=5e-2,
        head="ridge",
        eval_heads=["prototype"],
        ridge_dim=64,
        ridge_drift="linear",  # an added task carries the statistics as a task of one run does
    )
    return TrainConfig(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def grown(tiny_model, tmp_path_factory):
    """(one run over 5 tasks, a 3-task run grown by --add to 5 from elsewhere with its data deleted, sizes)."""
    root = tmp_path_factory.mktemp("grow")
    all5 = write_tasks(root / "all5", GROUPS, 16, 6)
    once = root / "once"
    train(config(all5, tiny_model), once, **QUIET)

    first3 = root / "first3"
    first3.mkdir()
    for t in ("t0", "t1", "t2"):
        shutil.copytree(all5 / t, first3 / t)
    run = root / "run"
    train(config(first3, tiny_model), run, **QUIET)
    size3 = size(run)
    shutil.rmtree(first3)  # P&M is exemplar-free: the old tasks' data is never needed again
    later = root / "later"  # names that sort before the old ones: appended all the same
    shutil.copytree(all5 / "t3", later / "a0-tools")
    shutil.copytree(all5 / "t4", later / "a1-food")
    grown = add_tasks(run, [later / "a0-tools"], **QUIET)
    grown = add_tasks(run, [later / "a1-food"], **QUIET)
    return once, run, grown, size3, later


def test_add_ends_where_one_run_ends(grown):
    once, run, result, _, _ = grown
    want = json.loads((once / "metrics.json").read_text())
    assert result["alphas"] == want["alphas"] and len(result["alphas"]) == 5
    assert result["ridge_lambdas"] == want["ridge_lambdas"]
    assert result["by_head"]["ridge"]["acc_matrix"] == want["by_head"]["ridge"]["acc_matrix"]
    assert result["by_head"]["prototype"]["acc_matrix"] == want["by_head"]["prototype"]["acc_matrix"]
    for name in ("merged", "fisher_sums"):
        a, b = (
            load_file(str(once / "state" / f"{name}.safetensors")),
            load_file(str(run / "state" / f"{name}.safetensors")),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # appended in the order given, whatever the folder names; nothing finished was retrained or renamed
    folders = sorted(p.name for p in (run / "tasks").iterdir())
    assert folders == ["00-t0", "01-t1", "02-t2", "03-a0-tools", "04-a1-food"]
    plan = json.loads((run / "plan.json").read_text())["tasks"]
    assert [e["sha256"] for e in plan] == [
        e["sha256"] for e in json.loads((once / "plan.json").read_text())["tasks"]
    ]
    info = json.loads((run / "tasks" / "03-a0-tools" / "task.json").read_text())
    assert info["data"]["sha256"] == plan[3]["sha256"] and info["index"] == 3


def test_run_size_grows_only_by_per_task_files(grown):
    _, run, _, size3, _ = grown
    merged = (run / "state" / "merged.safetensors").stat().st_size
    new = [run / "tasks" / "03-a0-tools", run / "tasks" / "04-a1-food"]
    for folder in (run / "tasks").iterdir():  # no weight-sized file in any task folder
        assert all(p.stat().st_size < merged / 4 for p in folder.rglob("*.safetensors")), folder
    # the state is replaced, not added to: what 2 more tasks add is their folders, plus a few kB of
    # classifier rows, plan and metrics
    assert size(run) - size3 - sum(size(f) for f in new) < 8_000
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_eval_from_another_directory_uses_the_kept_test_sets(grown, tmp_path, monkeypatch):
    from pmserve.export import export_bundle
    from pmserve.predict import evaluate

    _, run, result, _, later = grown
    bundle = tmp_path / "bundle"
    manifest = export_bundle(run, bundle)  # parity on the RUN's kept test sets: its first data folder is gone
    assert manifest["parity"]["inputs"]["tasks"] == ["t0", "t1", "t2", "a0-tools", "a1-food"]
    shutil.rmtree(later, ignore_errors=True)  # no data folder is left anywhere
    monkeypatch.chdir(tmp_path)
    res = evaluate(bundle, provider="cpu")
    assert [r["task"] for r in res["tasks"]] == ["t0", "t1", "t2", "a0-tools", "a1-food"]
    got = [r["acc"] for r in res["tasks"]]
    assert got == pytest.approx(result["by_head"]["ridge"]["acc_matrix"][-1], abs=1e-6)


def test_bad_additions_change_nothing(grown, tiny_model, tmp_path):
    once, run, _, _, _ = grown
    before = snapshot(run)
    again = tmp_path / "again"
    shutil.copytree(once.parent / "all5" / "t1", again / "t1-copy")
    with pytest.raises(PMError, match=r"t1-copy: already in this RUN as task 1"):
        add_tasks(run, [again / "t1-copy"], **QUIET)
    with pytest.raises(PMError, match=r"--rank: 4 differs from the RUN's 2 .*config.json"):
        add_tasks(run, [again / "t1-copy"], given={"rank": 4}, **QUIET)
    with pytest.raises(PMError, match="does not exist"):
        add_tasks(run, [tmp_path / "nowhere"], **QUIET)
    images = tmp_path / "img" / "digits"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("L", (8, 8)).save(images / "a.png")
    for split in ("train", "test"):
        (images / f"{split}.jsonl").write_text(json.dumps({"image": "a.png", "label": "zero"}) + "\n")
    with pytest.raises(PMError, match="holds image examples, but the RUN's tasks are text"):
        add_tasks(run, [images], **QUIET)
    # a RUN written by an older pmserve (format 1): one line saying what it can and cannot do
    old = tmp_path / "old"
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    with pytest.raises(PMError, match="RUN format 1 .* cannot resume or grow"):
        add_tasks(old, [again / "t1-copy"], **QUIET)
    assert snapshot(run) == before


def test_add_on_an_unfinished_run_says_resume(tiny_model, tmp_path, monkeypatch):
    from tests.test_train import killed_during

    data = write_tasks(tmp_path / "data", GROUPS[:2], 8, 4)
    undo = killed_during(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, tiny_model), tmp_path / "run", **QUIET)
    undo()
    more = write_tasks(tmp_path / "more", GROUPS[2:3], 8, 4, seed=5)
    with pytest.raises(PMError, match=r"task 1 of 2 is not finished; `pmserve train --resume"):
        add_tasks(tmp_path / "run", [more / "t0"], **QUIET)
    train(config(data, tiny_model), tmp_path / "run", resume=True, **QUIET)
    # an --add killed during its task: the same --add again finishes it (another one would be refused)
    undo = killed_during(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        add_tasks(tmp_path / "run", [more / "t0"], **QUIET)
    undo()
    other = write_tasks(tmp_path / "other", GROUPS[3:4], 8, 4, seed=6)
    with pytest.raises(PMError, match=r"task 2 of 3 is not finished"):
        add_tasks(tmp_path / "run", [other / "t0"], **QUIET)
    res = add_tasks(tmp_path / "run", [more / "t0"], **QUIET)
    assert (
        len(res["alphas"]) == 3
        and len(json.loads((tmp_path / "run" / "plan.json").read_text())["tasks"]) == 3
    )
    assert sorted(p.name for p in (tmp_path / "run" / "tasks").iterdir()) == ["00-t0", "01-t1", "02-t0"]


def test_without_kept_tests_a_missing_test_set_is_not_evaluated(tiny_model, tmp_path):
    data = write_tasks(tmp_path / "data", GROUPS[:1], 8, 4)
    run = tmp_path / "run"
    train(config(data, tiny_model, keep_test=False), run, **QUIET)
    assert not (run / "tasks" / "00-t0" / "test.jsonl").exists()
    shutil.rmtree(data)
    more = write_tasks(tmp_path / "more", GROUPS[1:2], 8, 4, seed=3)
    res = add_tasks(run, [more], **QUIET)
    assert res["acc_matrix"][1][0] is None and res["acc_matrix"][1][1] is not None
    assert res["ACC"] == res["acc_matrix"][1][1]  # the mean over what was measured, not a 0


def test_merge_of_a_run_without_fisher_files_uses_its_alphas(grown, tmp_path):
    from pmserve.merging import MergeOptions, merge_adapters

    _, run, result, _, _ = grown
    rep = merge_adapters([run], tmp_path / "d", options=MergeOptions("pm", "delta"), log=lambda *_: None)
    assert rep["fisher"] == "run" and rep["alphas"] == result["alphas"]
    ours, theirs = (
        load_file(str(tmp_path / "d" / "merged.safetensors")),
        load_file(str(run / "state" / "merged.safetensors")),
    )
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)


def test_cli_add_takes_the_runs_options_and_prints_progress_lines(tiny_model, tmp_path):
    data = write_tasks(tmp_path / "data", GROUPS[:1], 8, 4)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def pmserve(*args):
        return subprocess.run(
            [sys.executable, "-m", "pmserve", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    res = pmserve("train", data, "--model", tiny_model, "--out", run, "--rank", "2", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    more = write_tasks(tmp_path / "more", GROUPS[1:2], 8, 4, seed=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = (
        subprocess.run(  # from another directory, with a per-task --epochs; stdout is a pipe, not a terminal
            [
                sys.executable,
                "-m",
                "pmserve",
                "train",
                "--add",
                str(more / "t0"),
                "--out",
                str(run),
                "--epochs",
                "2",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=elsewhere,
        )
    )
    assert res.returncode == 0, res.stderr
    assert "t0: epoch 1/2" in res.stdout and "t0: epoch 2/2" in res.stdout and "left" in res.stdout
    info = json.loads((run / "tasks" / "01-t0" / "task.json").read_text())
    assert (
        info["epochs"] == 2 and json.loads((run / "tasks" / "00-t0" / "task.json").read_text())["epochs"] == 1
    )
    assert json.loads((run / "config.json").read_text())["rank"] == 2  # the RUN's, not the default
    res = pmserve("train", "--add", more / "t0", "--out", run, "--lr", "0.5")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--lr" in res.stderr, res.stderr
    res = pmserve("train", data, "--add", more / "t0", "--out", run)
    assert res.returncode == 2 and "DATA: not with --add" in res.stderr


def test_the_default_carry_asks_each_new_tasks_classes(tiny_model, tmp_path, monkeypatch):
    """Training hands drift_map the classes of the rows it fits, so the map is checked class by class."""
    import pmserve.heads as heads
    from pmserve import defaults

    seen, mus, real = [], [None], heads.drift_map

    def spy(before, after, groups=None):
        seen.append(sorted(set(groups)) if groups is not None else None)
        fitted = real(before, after, groups)
        M = torch.eye(before.shape[1], dtype=torch.float64) if fitted is None else fitted[0]
        mus.append(float(len(seen)))  # a penalty of the spy's own: the record must come from this call
        return M, mus[-1]

    monkeypatch.setattr(heads, "drift_map", spy)
    data = write_tasks(tmp_path / "data", GROUPS[:3], 16, 4)
    res = train(config(data, tiny_model, ridge_drift=defaults.TRAIN_RIDGE_DRIFT), tmp_path / "run", **QUIET)
    assert seen == [sorted(GROUPS[1]), sorted(GROUPS[2])]  # one carry per merge after the first task
    # each task's record holds its own map's penalty (None: the first task, carried by nothing)
    assert res["ridge_drift_mus"] == mus
    recorded = [
        json.loads(f.read_text())["ridge_drift_mu"]
        for f in sorted((tmp_path / "run").glob("tasks/*/task.json"))
    ]
    assert recorded == mus
