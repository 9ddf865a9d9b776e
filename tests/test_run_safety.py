"""A RUN with several writers and readers, and commands retried after a crash (issue 37, items 1-5 and 11):
one writer at a time, readers that see one whole state, a retried --add that ends where it would have, and a
RUN that refuses what it cannot continue from. Each test failed on the code before these fixes."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from pmserve.errors import PMError
from pmserve.formats import run as run_files
from pmserve.train import add_tasks, train
from tests.conftest import write_tasks
from tests.test_add import GROUPS, QUIET, config, snapshot
from tests.test_train import killed_during


@pytest.fixture()
def run2(tiny_model, tmp_path):
    """A finished 2-task RUN and three more task folders (c, d, x) to add."""
    data = write_tasks(tmp_path / "data", GROUPS[:2], 8, 4)
    run = tmp_path / "run"
    train(config(data, tiny_model), run, **QUIET)
    more = write_tasks(tmp_path / "more", GROUPS[2:5], 8, 4, seed=7)
    return run, {"c": more / "t0", "d": more / "t1", "x": more / "t2"}


def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(run2):
    run, new = run2
    before = snapshot(run)
    fd = os.open(run, os.O_RDONLY)  # what a writer holds for its whole life: the RUN folder, locked
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(PMError, match="another pmserve process is writing this RUN"):
            add_tasks(run, [new["c"]], **QUIET)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        res = subprocess.run(
            [sys.executable, "-m", "pmserve", "train", "--out", str(run), "--add", str(new["d"])],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        os.close(fd)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "another pmserve process is writing this RUN" in res.stderr
    assert snapshot(run) == before


def test_a_snapshot_keeps_its_state_while_the_run_grows(run2):
    from pmserve.formats.merged import inspect_merged

    run, new = run2
    src = inspect_merged(run)  # what export reads; the RUN then grows under it
    merged_before = (run / "state" / "merged.safetensors").read_bytes()
    add_tasks(run, [new["c"]], **QUIET)
    assert (
        src.tasks == ["t0", "t1"]
        and src.alphas == json.loads((run / "metrics.json").read_text())["alphas"][:2]
    )
    assert src.merged_file.read_bytes() == merged_before  # the state of the two tasks it lists, still whole
    assert json.loads((src.classifier_dir / "state.json").read_text())["tasks"] == 2
    assert (run / "state" / "merged.safetensors").read_bytes() != merged_before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # nothing of the reader's in the RUN


def test_a_retried_add_ends_with_its_tasks_in_order(run2, monkeypatch):
    run, new = run2
    undo = killed_during(3, monkeypatch)  # --add c d killed while d trains (c finished)
    with pytest.raises(KeyboardInterrupt):
        add_tasks(run, [new["c"], new["d"]], **QUIET)
    undo()
    with pytest.raises(PMError, match=r"task 3 of 4 is not finished"):  # another list is a conflict
        add_tasks(run, [new["x"], new["d"]], **QUIET)
    first = add_tasks(run, [new["c"], new["d"]], **QUIET)  # the same command finishes it
    before = snapshot(run)
    again = add_tasks(run, [new["c"], new["d"]], **QUIET)  # and once more: nothing to do, no error
    assert again["alphas"] == first["alphas"] and len(first["alphas"]) == 4
    assert snapshot(run) == before
    with pytest.raises(PMError, match="already in this RUN as task 2"):  # c elsewhere than at the end
        add_tasks(run, [new["c"], new["x"], new["d"]], **QUIET)
    plan = json.loads((run / "plan.json").read_text())["tasks"]
    assert [e["sha256"] for e in plan[2:]] == [
        json.loads((p / "task.json").read_text())["data"]["sha256"] for p in run_files.finished_tasks(run)[2:]
    ]


def test_eval_of_an_older_version_uses_only_the_tasks_it_saw(run2, tmp_path):
    from pmserve.export import export_bundle
    from pmserve.predict import evaluate

    run, new = run2
    bundle = tmp_path / "v1"
    export_bundle(run, bundle)
    add_tasks(run, [new["c"]], **QUIET)
    res = evaluate(bundle, provider="cpu")
    assert [r["task"] for r in res["tasks"]] == ["t0", "t1"]


def test_config_records_the_modules_adapted(run2):
    cfg = json.loads((run2[0] / "config.json").read_text())
    assert cfg["target_modules"] != ["all-linear"] and "query" in cfg["target_modules"]


def test_a_run_without_its_plan_is_refused(run2, tiny_model):
    run, _ = run2
    (run / "plan.json").unlink()
    data = json.loads((run / "config.json").read_text())["data"]
    with pytest.raises(PMError, match="plan.json: missing, but 2 tasks are finished"):
        train(config(data, tiny_model), run, resume=True, **QUIET)


def test_a_run_from_a_newer_pmserve_is_not_continued(run2):
    run, new = run2
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "future_option": 3}))
    with pytest.raises(PMError, match="future_option are unknown to this pmserve"):
        add_tasks(run, [new["c"]], **QUIET)


def test_a_state_missing_a_file_is_refused(run2):
    run, new = run2
    (run / "state" / "fisher_sums.safetensors").unlink()
    with pytest.raises(PMError, match="fisher_sums.safetensors: missing from the RUN's state"):
        add_tasks(run, [new["c"]], **QUIET)
    assert len(run_files.finished_tasks(run)) == 2
