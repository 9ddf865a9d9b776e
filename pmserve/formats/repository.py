"""A model repository: bundles as numbered versions of named models, the layout Triton and KServe use.

    REPO/                       `pmserve serve --repository REPO`
      NAME/                     one model folder per served model name
        1/  2/  3/              versions: each a complete BUNDLE (`pmserve export --new-version`)
        .4.tmp-PID/             a version still being written (hidden: never a number until it is complete)

A version is a folder named by a positive integer without leading zeros; the highest is the newest. A version is
written under a hidden temporary name and renamed when complete, so a number only ever names a finished bundle,
and a finished version is never overwritten: a new export takes the next number. Other entries (files, hidden
folders) are left alone, but a visible folder whose name starts with a digit and is not a version ("3.old",
"04") looks like a version and is not one, so exporting into that model folder is refused until it is renamed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import PMError
from . import atomic_dir
from .bundle import is_bundle


def version_name(name: str) -> int | None:
    """The version a folder name stands for, or None: "3" -> 3; "03", "0", "3.tmp", ".3" -> None."""
    if name.isdigit() and name.isascii() and name[0] != "0":
        return int(name)
    return None


def versions(model_dir: Path) -> list[int]:
    """The model folder's versions, oldest first (hidden temporary folders are not versions)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = (version_name(p.name) for p in model_dir.iterdir() if p.is_dir())
    return sorted(v for v in found if v is not None)


def version_dir(model_dir: Path, version: int) -> Path:
    return Path(model_dir) / str(version)


def check_model_dir(model_dir: Path) -> None:
    """A model folder (or a path where one will be made) that a new version may go into: not a bundle itself, not
    a file, and holding no folder that looks like a version but is not one."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return
    if not model_dir.is_dir():
        raise PMError(f"{model_dir}: not a folder (a model folder holds numbered versions 1/, 2/, ...)")
    if is_bundle(model_dir):
        raise PMError(
            f"{model_dir}: is a bundle itself, not a model folder of numbered versions (give its parent a "
            "new model name, e.g. REPO/NAME)"
        )
    for p in sorted(model_dir.iterdir()):
        if p.is_dir() and p.name[:1].isdigit() and version_name(p.name) is None:
            raise PMError(
                f"{p}: looks like a version folder but is not one (a version is named 1, 2, ...); "
                "rename or remove it"
            )


@contextmanager
def new_version(model_dir: Path) -> Iterator[tuple[int, Path]]:
    """(version, temporary folder): write the bundle into the folder; when the block ends it becomes
    MODEL_DIR/<version>, the next number after the highest there. Another writer that took the same number first
    wins and this one is refused (nothing is overwritten)."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    created = not model_dir.exists()
    version = max(versions(model_dir), default=0) + 1
    out = version_dir(model_dir, version)
    written = False
    try:
        with atomic_dir(out) as tmp:
            yield version, tmp
            written = True
    except OSError as e:
        if written and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise PMError(
                f"{out}: another export wrote this version first; nothing overwritten, run again"
            ) from None
        raise
    finally:
        if created and not written:  # a failed first export leaves no empty model folder behind
            try:
                model_dir.rmdir()
            except OSError:
                pass


def model_dirs(repo: Path) -> list[Path]:
    """The repository's model folders, by name (hidden folders and files are not models)."""
    return sorted(p for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith("."))


def check_repository(repo: Path) -> list[Path]:
    """The model folders of REPO, which must exist, not be a bundle, and hold at least one model with a version."""
    repo = Path(repo)
    if not repo.is_dir():
        raise PMError(f"--repository {repo}: does not exist or is not a folder")
    if is_bundle(repo):
        raise PMError(
            f"--repository {repo}: is a bundle, not a repository (serve it as BUNDLE, or use REPO/NAME/1)"
        )
    models = model_dirs(repo)
    if not any(versions(m) for m in models):
        raise PMError(
            f"--repository {repo}: holds no model with a version (expected REPO/NAME/1/...; "
            "`pmserve export SOURCE --out REPO/NAME --new-version` writes one)"
        )
    return models


def fingerprint(folder: Path) -> tuple:
    """Names, sizes and modification times of the files under `folder`: what changes while a folder is still
    being copied, so a version that failed its checks half-copied is tried again once it changes."""
    try:
        return tuple(
            sorted(
                (p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
                for p in Path(folder).rglob("*")
                if p.is_file() and (st := p.stat())
            )
        )
    except OSError:  # the folder changed under us: it is still being written
        return ()
