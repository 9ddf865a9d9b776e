"""A RUN folder, as `pmserve train` writes it and every other command reads it.

    RUN/config.json          the resolved TrainConfig, marked {"format": "pmserve-run", "format_version": 2}
    RUN/plan.json            the task sequence: each task's name, data source, sha256 and epochs, in order;
                             it only grows (`pmserve train --add` appends), so a task's index never changes
    RUN/metrics.json         the results of the whole run so far
    RUN/state/               what continuing the run needs, once, replaced whole after every task:
        state.json           how many tasks it reflects, every label seen, the input kind
        merged.safetensors   W_hat - W_0 of the adapted matrices (also `pmserve merge --format delta`'s file)
        fisher_sums.safetensors   the P&M accumulators S_F and S_Ft (pm and merge runs)
        head.* / classifier.* / eval-NAME.*   the training head and the inference classifiers
    RUN/tasks/NN-name/       one folder per finished task, written under a temporary name and renamed:
        task.json            alpha, accuracies, labels, data hash, seconds
        adapter_model.safetensors, adapter_config.json, pmserve_adapter.json   the task's LoRA (formats.peft)
        test.jsonl           the task's test split (unless --no-keep-test), so later tasks evaluate on it
        fisher.safetensors   the diagonal Fisher at theta*_t, only with --keep-fisher (offline pm re-merges)
        README.md            the task's model card

So a RUN grows with its tasks only by what is per task; the merged weights after any task are reproducible
from the adapters and the recorded alphas (merging.recurrence). The state is replaced in two steps that a kill
cannot tear: the new state is written whole beside the old (.state-next), the task folder is renamed into
place, then the states swap; `recover` finishes a swap a kill interrupted.

Format 1 (before 2026-11-29) kept the state in every task folder (fisher, delta, merged and heads per task):
it still reads (state_dir is then the last task folder), but only format 2 can grow or resume.
A RUN says it is one in its config.json; RUNs written before that marker are recognised by the TrainConfig
keys they hold, here and nowhere else.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import PMError
from . import read_json, write_json

FORMAT = "pmserve-run"
VERSION = 2
CONFIG = "config.json"
PLAN = "plan.json"
METRICS = "metrics.json"
TASKS = "tasks"
TASK_INFO = "task.json"
TEST = "test.jsonl"
FISHER = "fisher.safetensors"
STATE = "state"
STATE_INFO = "state.json"
FISHER_SUMS = "fisher_sums.safetensors"
MERGED = (
    "merged.safetensors"  # W_hat - W_0 of the adapted matrices; also `pmserve merge --format delta`'s file
)
_NEXT_STATE, _OLD_STATE = ".state-next", ".state-old"
HEAD = "head"  # heads.save_scorer prefixes: the training head,
CLASSIFIER = "classifier"  # the inference classifier (--head)
TASK_FOLDER = re.compile(r"^(\d+)-(.+)$")
_LEGACY_KEYS = ("data", "method", "model")  # a RUN's config.json before the format marker


def is_run_config(cfg: dict) -> bool:
    """Whether a config.json's contents are a RUN's (rather than, say, a Hugging Face model's)."""
    if "format" in cfg:
        return cfg["format"] == FORMAT
    return all(k in cfg for k in _LEGACY_KEYS) and "model_type" not in cfg


def is_run(folder: Path) -> bool:
    cfg = Path(folder) / CONFIG
    return cfg.is_file() and is_run_config(read_json(cfg))


def read_config(run: Path) -> dict:
    """The RUN's config.json (without the format marker); a newer format than this pmserve reads is refused."""
    path = Path(run) / CONFIG
    cfg = read_json(path)
    if not is_run_config(cfg):
        raise PMError(f"{path}: not a pmserve RUN's config")
    if cfg.get("format_version", 1) > VERSION:
        raise PMError(
            f"{path}: RUN format {cfg['format_version']} is newer than this pmserve reads ({VERSION})"
        )
    return {k: v for k, v in cfg.items() if k not in ("format", "format_version")}


def write_config(run: Path, cfg: dict) -> None:
    write_json(Path(run) / CONFIG, {"format": FORMAT, "format_version": VERSION, **cfg})


def format_version(run: Path) -> int:
    return int(read_json(Path(run) / CONFIG).get("format_version", 1))


def check_growable(run: Path) -> None:
    """Only a format-2 RUN can resume or grow: an older one says how to go on, in one line."""
    v = format_version(run)
    if v < VERSION:
        raise PMError(
            f"{Path(run) / CONFIG}: RUN format {v} (written by an older pmserve) keeps no constant-size state, so it "
            f"cannot resume or grow; it still exports and merges; to add tasks, train its data again into a new --out"
        )


def read_plan(run: Path) -> list[dict]:
    path = Path(run) / PLAN
    if not path.is_file():
        return []
    plan = read_json(path).get("tasks")
    if not isinstance(plan, list):
        raise PMError(f"{path}: no 'tasks' list")
    return plan


def write_plan(run: Path, plan: list[dict]) -> None:
    write_json(Path(run) / PLAN, {"tasks": plan})


def state_dir(run: Path) -> Path:
    """Where the state after the last finished task is, without changing anything (a reader may look while a
    run trains): RUN/state, or RUN/.state-next between a task folder's rename and the swap; for format 1 the
    last task folder."""
    run = Path(run)
    finished = finished_tasks(run)
    if format_version(run) < 2:
        if not finished:
            raise PMError(f"{run}: no finished task (no tasks/NN-name/{TASK_INFO})")
        return finished[-1]
    for folder in (run / STATE, run / _NEXT_STATE):
        if (folder / STATE_INFO).is_file() and state_tasks(folder) == len(finished):
            return folder
    raise PMError(f"{run / STATE}: missing, or does not reflect the {len(finished)} finished tasks")


@contextmanager
def next_state(run: Path) -> Iterator[Path]:
    """A folder to write the next state into (RUN/.state-next, replaced if a killed run left one)."""
    tmp = Path(run) / _NEXT_STATE
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote_state(run: Path) -> None:
    """Make RUN/.state-next the state: once the task folder it belongs to is in place."""
    run = Path(run)
    if (run / STATE).exists():
        shutil.rmtree(run / _OLD_STATE, ignore_errors=True)
        os.rename(run / STATE, run / _OLD_STATE)
    os.rename(run / _NEXT_STATE, run / STATE)
    shutil.rmtree(run / _OLD_STATE, ignore_errors=True)


def state_tasks(folder: Path) -> int:
    return int(read_json(Path(folder) / STATE_INFO)["tasks"])


def recover(run: Path) -> None:
    """Finish what a killed run left: a state swap between its two renames, half-written folders."""
    run = Path(run)
    done = len(finished_tasks(run))
    nxt = run / _NEXT_STATE
    if (nxt / STATE_INFO).is_file() and state_tasks(nxt) == done:
        promote_state(run)  # the task folder made it; its state had not yet
    shutil.rmtree(nxt, ignore_errors=True)
    if not (run / STATE).exists() and (run / _OLD_STATE / STATE_INFO).is_file():
        os.rename(run / _OLD_STATE, run / STATE)
    shutil.rmtree(run / _OLD_STATE, ignore_errors=True)
    remove_partial_tasks(run)
    if done and (run / STATE / STATE_INFO).is_file() and state_tasks(run / STATE) != done:
        raise PMError(f"{run / STATE}: reflects {state_tasks(run / STATE)} tasks, but {done} are finished")


def task_dir(run: Path, index: int, name: str) -> Path:
    return Path(run) / TASKS / f"{index:02d}-{name}"


def finished_tasks(run: Path) -> list[Path]:
    """The RUN's finished task folders (those with task.json), in task order."""
    tasks = Path(run) / TASKS
    found = [
        p for p in (tasks.iterdir() if tasks.is_dir() else []) if p.is_dir() and TASK_FOLDER.match(p.name)
    ]
    found = [p for p in found if (p / TASK_INFO).is_file()]
    return sorted(found, key=lambda p: int(TASK_FOLDER.match(p.name).group(1)))


def remove_partial_tasks(run: Path) -> None:
    """Delete the hidden half-written task folders a killed run left in tasks/ (never a finished one)."""
    for stale in (Path(run) / TASKS).glob(".*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def run_of_task(folder: Path) -> Path | None:
    """The RUN a task folder belongs to, or None for a folder outside a RUN."""
    folder = Path(folder)
    run = folder.parent.parent
    if folder.parent.name == TASKS and TASK_FOLDER.match(folder.name) and is_run(run):
        return run
    return None
