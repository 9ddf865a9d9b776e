"""The command line: bad input gives one line naming the problem, exit 2, no traceback, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_tasks


def pmserve(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "pmserve", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_train_cli_end_to_end_and_compare(tiny_model, tiny_tasks, tmp_path):
    out = tmp_path / "run"
    res = pmserve(
        "train", tiny_tasks, "--model", tiny_model, "--out", out, "--epochs", "1", "--rank", "2", "--quiet"
    )
    assert res.returncode == 0, res.stderr
    assert "ACC" in res.stdout and (out / "acc_matrix.png").stat().st_size > 1000
    again = pmserve("train", tiny_tasks, "--model", tiny_model, "--out", out, "--quiet")
    assert_one_line_error(again, str(out), "--resume")
    other = pmserve(
        "train", tiny_tasks, "--model", tiny_model, "--out", out, "--method", "seq", "--resume", "--quiet"
    )
    assert_one_line_error(other, "config.json", "method")
    cmp = pmserve("compare", out, out)
    assert cmp.returncode == 0 and "pm" in cmp.stdout


@pytest.mark.parametrize(
    "case",
    [
        "missing_folder",
        "empty_task",
        "no_label",
        "no_text",
        "unseen_test_label",
        "bad_model",
        "non_numeric",
        "bad_json",
        "bad_method",
    ],
)
def test_bad_input(case, tiny_model, tmp_path):
    data = write_tasks(tmp_path / "data", [["animal", "food"], ["tool", "place"]], n_train=4, n_test=2)
    model, extra, needles = tiny_model, [], []
    if case == "missing_folder":
        data, needles = tmp_path / "nope", ["nope", "does not exist"]
    elif case == "empty_task":
        for f in (data / "t1").iterdir():
            f.unlink()
        needles = ["t1", "no train"]
    elif case == "no_label":
        (data / "t0" / "train.jsonl").write_text(json.dumps({"text": "dog"}) + "\n")
        needles = ["train.jsonl", "'label'"]
    elif case == "no_text":
        (data / "t0" / "train.jsonl").write_text(json.dumps({"words": "dog", "label": "a"}) + "\n")
        needles = ["train.jsonl", "'text'"]
    elif case == "unseen_test_label":
        with (data / "t1" / "test.jsonl").open("a") as f:
            f.write(json.dumps({"text": "dog", "label": "zebra"}) + "\n")
        needles = ["t1", "never seen", "zebra"]
    elif case == "bad_model":
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text("{not json")
        needles = ["config.json", "unreadable"]
    elif case == "non_numeric":
        extra, needles = ["--epochs", "five"], ["--epochs", "integer"]
    elif case == "bad_json":
        (data / "t0" / "test.jsonl").write_text("{oops\n")
        needles = ["test.jsonl", "line 1"]
    elif case == "bad_method":
        extra, needles = ["--method", "magic"], ["--method", "magic"]
    out = tmp_path / "run"
    res = pmserve("train", data, "--model", model, "--out", out, "--quiet", *extra)
    assert_one_line_error(res, *needles)
    assert not out.exists()
