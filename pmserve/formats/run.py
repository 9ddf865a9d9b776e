"""A RUN folder, as `pmserve train` writes it and every other command reads it.

    RUN/config.json          the resolved TrainConfig, marked {"format": "pmserve-run"}
    RUN/metrics.json         the results of the whole run
    RUN/tasks/NN-name/       one folder per finished task, written under a temporary name and renamed:
        task.json            alpha, accuracies, labels, seconds
        adapter_model.safetensors, adapter_config.json, pmserve_adapter.json   the task's LoRA (formats.peft)
        fisher.safetensors   diagonal Fisher at theta*_t;  delta.safetensors  the task vector
        merged.safetensors   W_hat_t - W_0;  head.* / classifier.* / eval-NAME.*  the heads (heads.save_scorer)
        README.md            the task's model card

A RUN says it is one in its config.json; RUNs written before that marker are recognised by the TrainConfig
keys they hold, here and nowhere else.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import PMError
from . import read_json, write_json

FORMAT = "pmserve-run"
VERSION = 1
CONFIG = "config.json"
METRICS = "metrics.json"
TASKS = "tasks"
TASK_INFO = "task.json"
FISHER = "fisher.safetensors"
DELTA = "delta.safetensors"
MERGED = (
    "merged.safetensors"  # W_hat - W_0 of the adapted matrices; also `pmserve merge --format delta`'s file
)
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
