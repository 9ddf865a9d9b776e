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
place, then the states swap; `recover` finishes a swap a kill interrupted. Every file and folder is fsynced
before the rename that makes it visible.

Several processes may touch one RUN, as SQLite's readers and writer do:
- one writer at a time (`writing`: an exclusive flock on the RUN folder for the writer's whole life; a second
  writer is refused in one line, and the lock dies with its process, so a kill never leaves the RUN locked);
- readers (export, eval, predict, merge) take a `snapshot`: under a shared flock on RUN/tasks, which the writer
  holds exclusively while a task folder and its state appear, they hard-link the state's files into a private
  folder (removed when the reader exits). Files are never rewritten in place, so the snapshot stays the one
  state that matched the finished tasks it lists, whatever the writer does next.

Format 1 (before 2026-11-29) kept the state in every task folder (fisher, delta, merged and heads per task):
it still reads (its snapshot's state is then the last task folder), but only format 2 can grow or resume.
A RUN says it is one in its config.json; RUNs written before that marker are recognised by the TrainConfig
keys they hold, here and nowhere else.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import PMError
from ..files import alive, fsync_dir, fsync_tree
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
_SNAPSHOTS = ".snapshots"


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
    """The planned tasks; [] for a RUN killed before it wrote its plan (or a format-1 RUN, which has none). A
    format-2 RUN with finished tasks and no plan is refused: its data folder cannot tell which tasks it planned
    (tasks added with --add are in no data folder)."""
    path = Path(run) / PLAN
    if not path.is_file():
        finished = finished_tasks(run)
        if finished and format_version(run) >= VERSION:
            raise PMError(
                f"{path}: missing, but {len(finished)} tasks are finished; the RUN's plan cannot be rebuilt "
                "(restore plan.json from a copy of the RUN)"
            )
        return []
    plan = read_json(path).get("tasks")
    if not isinstance(plan, list):
        raise PMError(f"{path}: no 'tasks' list")
    return plan


def write_plan(run: Path, plan: list[dict]) -> None:
    write_json(Path(run) / PLAN, {"tasks": plan})


def _live_state(run: Path, finished: list[Path]) -> Path:
    """The folder holding the state after the `finished` tasks right now: RUN/state, or RUN/.state-next between
    a task folder's rename and the swap (a writer may rename either at any moment: see `snapshot`)."""
    for folder in (run / STATE, run / _NEXT_STATE):
        if (folder / STATE_INFO).is_file() and state_tasks(folder) == len(finished):
            return folder
    raise PMError(f"{run / STATE}: missing, or does not reflect the {len(finished)} finished tasks")


@dataclass(frozen=True)
class Snapshot:
    """One state of a RUN as a reader sees it: the finished task folders, and a folder with the state after
    them that no writer changes while the reader reads."""

    finished: list[Path]
    state: Path


def snapshot(run: Path) -> Snapshot:
    """The RUN's finished tasks and the state that matches them, resolved once (see the module docstring).
    For format 1 the state is the last task folder, which nothing rewrites. Where no private copy can be made
    (a read-only RUN, where no writer can run either), the live state folder is returned."""
    run = Path(run)
    if format_version(run) < 2:
        finished = finished_tasks(run)
        if not finished:
            raise PMError(f"{run}: no finished task (no tasks/NN-name/{TASK_INFO})")
        return Snapshot(finished, finished[-1])
    with _flock(run / TASKS, fcntl.LOCK_SH):
        finished = finished_tasks(run)
        live = _live_state(run, finished)
        dst = None
        try:
            dst = _snapshot_root(run) / f"{os.getpid()}-{os.urandom(6).hex()}"
            dst.mkdir(parents=True)
            for f in live.iterdir():
                if f.is_file():
                    os.link(f, dst / f.name)  # the same bytes: the writer replaces files, never rewrites them
        except OSError:
            if dst is not None:
                shutil.rmtree(dst, ignore_errors=True)
            return Snapshot(finished, live)
    atexit.register(shutil.rmtree, dst, True)
    return Snapshot(finished, dst)


def _snapshot_root(run: Path) -> Path:
    """Where snapshots of `run` go: the temporary folder when it is on the RUN's file system (hard links
    need that), else RUN/.snapshots. Snapshots of readers that died are removed first (they pin old states)."""
    tmp = Path(tempfile.gettempdir()) / "pmserve-snapshots"
    root = tmp if os.stat(tempfile.gettempdir()).st_dev == os.stat(run).st_dev else run / _SNAPSHOTS
    for stale in root.glob("*-*"):
        pid = stale.name.split("-", 1)[0]
        if not pid.isdigit() or not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return root


@contextmanager
def _flock(folder: Path, how: int) -> Iterator[None]:
    """`folder` locked with flock(how) for the block (a folder, so that locking leaves no file behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def writing(run: Path) -> Iterator[None]:
    """The RUN's writer lock (the RUN folder itself, locked), held for the block: the one process that may
    write the RUN. Another writer is a PMError at once (it never waits: the holder may train for an hour), and
    the lock dies with its process. The RUN folder is created if needed."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PMError(
                f"{run}: another pmserve process is writing this RUN; wait for it to finish, then run this again"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def swapping(run: Path) -> Iterator[None]:
    """Held by the writer while a finished task folder and its state appear (readers' snapshots wait)."""
    with _flock(Path(run) / TASKS, fcntl.LOCK_EX):
        yield


@contextmanager
def next_state(run: Path) -> Iterator[Path]:
    """A folder to write the next state into (RUN/.state-next, replaced if a killed run left one)."""
    tmp = Path(run) / _NEXT_STATE
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def promote_state(run: Path) -> None:
    """Make RUN/.state-next the state: once the task folder it belongs to is in place (under `swapping`)."""
    run = Path(run)
    if (run / STATE).exists():
        shutil.rmtree(run / _OLD_STATE, ignore_errors=True)
        os.rename(run / STATE, run / _OLD_STATE)
    os.rename(run / _NEXT_STATE, run / STATE)
    fsync_dir(run)
    shutil.rmtree(run / _OLD_STATE, ignore_errors=True)


def state_tasks(folder: Path) -> int:
    return int(read_json(Path(folder) / STATE_INFO)["tasks"])


def recover(run: Path) -> None:
    """Finish what a killed run left: a state swap between its two renames, half-written folders. Only the
    writer calls it (under `writing`)."""
    run = Path(run)
    done = len(finished_tasks(run))
    nxt = run / _NEXT_STATE
    with swapping(run):
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
