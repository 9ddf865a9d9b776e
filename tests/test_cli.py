"""The command line: bad input gives one line naming the problem, exit 2, no traceback, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_tasks


def pmserve(*args, cwd=None, **env_vars):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **env_vars}
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


def test_version():
    from pmserve import __version__

    res = pmserve("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"pmserve {__version__}"


@pytest.mark.parametrize("command", ["train", "merge", "export", "predict", "serve"])
def test_help_shows_flags_as_flags(command):
    res = pmserve(command, "--help", COLUMNS="200", TERM="dumb")
    assert res.returncode == 0, res.stderr
    assert "--help" in res.stdout and "<bool>" not in res.stdout, res.stdout
    if command == "export":
        assert "--optimize" in res.stdout and "--no-optimize" in res.stdout


def test_train_help_names_every_builtin_sequence():
    res = pmserve("train", "--help", COLUMNS="300", TERM="dumb")
    for needle in (
        "builtin:wordnet-nouns",
        "builtin:wordnet-verbs",
        "builtin:digits",
        "builtin:clinc150",
        ":tasks=10,classes=2",
    ):
        assert needle in res.stdout, needle


def _merge_options():
    from pmserve.merging import MergeOptions

    return MergeOptions


def _option_class(command):
    if command == "train":
        from pmserve.train import TrainConfig as cls
    elif command == "merge":
        cls = _merge_options()
    elif command == "export":
        from pmserve.export import ExportOptions as cls
    elif command == "serve":
        from pmserve.serving.config import ServeConfig as cls
    else:
        from pmserve.bench import BenchConfig as cls
    return cls


@pytest.mark.parametrize(
    "command, prefix, renamed",
    [
        ("train", "TRAIN", {}),
        ("merge", "MERGE", {}),
        ("export", "EXPORT", {}),
        ("serve", "SERVE", {"drain_timeout": "drain_s"}),
        ("bench", "BENCH", {}),
    ],
)
def test_cli_defaults_are_the_library_defaults(command, prefix, renamed):
    """Every option default of the command is its option class's field default, and both are pmserve.defaults'."""
    import dataclasses

    import typer.main
    from pmserve.cli.main import app
    from pmserve.cli.options import parse_list

    from pmserve import defaults

    fields = {}
    for f in dataclasses.fields(_option_class(command)):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = f.default_factory()
    for name, value in fields.items():  # the module holds what the class holds
        constant = f"{prefix}_{name.upper()}"
        if hasattr(defaults, constant):
            held = getattr(defaults, constant)
            assert (list(held) if isinstance(held, tuple) else held) == value, constant
    params = typer.main.get_command(app).commands[command].params
    compared = 0
    for p in params:
        name = renamed.get(p.name, p.name)
        if name not in fields:
            continue
        want, got = fields[name], p.default
        if isinstance(want, list):  # a comma-separated option
            got = parse_list(got, name, type(want[0]) if want else str)
        elif want is None and got in ("", 0):  # "not given" on the command line
            got = None
        assert got == want, (
            f"{command} --{p.name.replace('_', '-')}: {got!r} on the command line, {want!r} in the library"
        )
        assert hasattr(defaults, f"{prefix}_{name.upper()}"), (
            f"pmserve.defaults has no {prefix}_{name.upper()}"
        )
        compared += 1
    assert compared >= min(5, len(fields)), compared


def test_parse_list():
    from pmserve.cli.options import parse_list

    from pmserve.errors import PMError

    assert parse_list(" a, b,,c ", "x") == ["a", "b", "c"]
    assert parse_list("", "x", int) == []
    assert parse_list("1,8, 32", "batch-sizes", int) == [1, 8, 32]
    assert parse_list("0.5,1e-1", "weights", float) == [0.5, 0.1]
    with pytest.raises(PMError, match="--batch-sizes: expected comma-separated integers, got '1,x'"):
        parse_list("1,x", "batch-sizes", int)


def test_bad_list_option_is_one_line(tmp_path):
    res = pmserve("bench", tmp_path, "--batch-sizes", "1,eight")
    assert_one_line_error(res, "--batch-sizes", "1,eight")


def _fake_run(path, tasks, head="ridge"):
    n = len(tasks)
    acc = [[0.9] * (i + 1) for i in range(n)]
    path.mkdir(parents=True)
    metrics = {
        "method": "pm",
        "head": head,
        "tasks": tasks,
        "acc_matrix": acc,
        "ACC": 0.9,
        "AAA": 0.9,
        "forgetting": 0.0,
        "alphas": [1.0] * n,
        "seconds": 1.0,
        "config": {"data": "data/tasks", "method": "pm", "head": head},
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_compare_warns_on_different_task_counts(tmp_path):
    a = _fake_run(tmp_path / "a", ["t0", "t1", "t2"])
    b = _fake_run(tmp_path / "b", ["t0", "t1"])
    res = pmserve("compare", a, b)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("pmserve: warning:"), res.stderr
    assert "tasks" in lines[0] and ": 3" in lines[0] and ": 2" in lines[0], lines[0]
    assert "ACC" in res.stdout
    same = pmserve("compare", a, a)
    assert same.returncode == 0 and same.stderr.strip() == "", same.stderr
    heads = pmserve("compare", a, _fake_run(tmp_path / "c", ["t0", "t1", "t2"], head="linear"))
    assert heads.returncode == 0 and heads.stderr.startswith("pmserve: warning:"), heads.stderr
    assert "heads" in heads.stderr
