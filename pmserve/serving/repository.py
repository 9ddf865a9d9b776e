"""`pmserve serve --repository REPO`: which version of each model serves, while the repository changes under it.

Triton and KServe keep models in a repository of numbered versions (layout: pmserve.formats.repository) and
load, unload and list them through the model repository extension; this module does that for pmserve bundles.

- A version is its number AND its content (`content`: its files' names, sizes and modification times): a version
  folder deleted and written again under the same number, or changed in place, is a new candidate, never taken
  for the one already served.
- Every candidate passes the checks every bundle passes (pmserve.serving.model.load_bundle: hashes, ONNX Runtime,
  the parity probe) first in a child process (pmserve.serving.candidate: a model that crashes ONNX Runtime kills
  the child, not the server), then in the server's process.
- At start every model folder serves its newest version that passes; a version that fails is recorded with its
  reason and the next older one is tried.
- Every --poll-s seconds it looks for candidates: versions at or above the one served that it has not settled
  (not present when the version served was chosen, or changed since), and loads the newest that passes, in a
  worker thread while the old version goes on serving, then swaps (ModelTable.put: requests already holding the
  old version finish on it). A version that failed stays refused, the old one serves, and it is tried again only
  once its files change (a copy that was still in progress has completed).
- POST /v2/repository/models/NAME/load loads the newest version, or {"parameters": {"version": "V"}}: rolling
  back is loading an older version. The versions present at that moment are settled: the poller leaves NAME on
  the version loaded until a version appears that was not there then (a new number, or a number whose files
  changed); so does unload, which stops serving NAME (later requests get 404). Loading the version already served,
  unchanged, does nothing and answers READY.
- POST /v2/repository/index lists every version of every model: READY (served, and its files are those loaded)
  or UNAVAILABLE with the reason. Reasons name files relative to the repository, never the server's paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PMError
from ..formats.bundle import is_bundle
from ..formats.repository import (
    check_repository,
    fingerprint,
    model_dirs,
    version_dir,
    versions,
)
from .candidate import Prober
from .config import ServeConfig
from .metrics import Metrics
from .model import Served, load_bundle
from .model_table import ModelTable
from .protocol import READY, UNAVAILABLE, RequestError


@dataclass
class _Model:
    """What the repository knows of one model folder."""

    name: str
    served: int | None = None  # the version serving now
    served_content: str = ""  # its content when it was loaded
    settled: set[tuple[int, str]] = field(default_factory=set)  # (version, content) the poller leaves alone
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # version -> (reason, content then)
    history: set[int] = field(default_factory=set)  # versions that served at some point


class Repository:
    """The models of REPO and the versions they serve; `load_all` before the server starts, then `start` with
    the server's ModelTable; the app adds the repository endpoints, which call `index`, `load` and `unload`."""

    def __init__(self, root: Path, cfg: ServeConfig, log: Callable[[str], None] = print):
        self.root, self.cfg, self.log = Path(root), cfg, log
        self.models: dict[str, _Model] = {}
        self.table: ModelTable | None = None
        self.metrics: Metrics | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task | None = None
        self.prober = Prober()  # candidates' graphs run in child processes first

    # ------------------------------------------------------------ before the server starts

    def load_all(self) -> list[Served]:
        """The newest good version of every model; a repository where none can serve is a PMError."""
        check_repository(self.root)
        out = []
        for folder in model_dirs(self.root):
            m = self._model(folder.name)
            present = self._snapshot(m.name)
            for v in self._candidates(m):
                result, seconds, content = self._load(m.name, v)
                served = self._settle(m, v, result, seconds, content)
                if served is not None:
                    self._served(m, v, content, present)
                    out.append(served)
                    break
        failures = [(m, v, r) for m in self.models.values() for v, (r, _) in sorted(m.failed.items())]
        if not out:
            first = failures[0][2] if failures else "no versions"
            raise PMError(f"--repository {self.root}: no version of any model passes its checks ({first})")
        for m, v, reason in failures:  # logged once the server is sure to start: an error stays one line
            self._log_refused(m, v, reason)
        return out

    # ------------------------------------------------------------ while it serves

    def start(self, table: ModelTable, metrics: Metrics) -> None:
        self.table, self.metrics = table, metrics
        if self.cfg.poll_s:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        self.prober.close()

    async def refresh(self) -> None:
        """One look at the repository: every model with a version newer than its chosen one loads the newest of
        them that passes, and swaps to it."""
        for folder in model_dirs(self.root):
            m = self._model(folder.name)
            async with self._lock(m.name):
                present = self._snapshot(m.name)
                for v in self._candidates(m):
                    if await self._load_and_swap(m, v, present):
                        break

    async def load(self, name: str, version: int | None = None) -> Served:
        """Serve version `version` of `name` (the newest when None), after the same checks; 404 for a model or
        version that is not in the repository, 400 when the version fails a check (the old one goes on)."""
        folder = self.root / name
        if not folder.is_dir() or name.startswith("."):
            raise RequestError(404, f"no model folder {name!r} in the repository")
        m = self._model(name)
        async with self._lock(name):
            numbers = versions(folder)
            if not numbers:
                raise RequestError(400, f"model {name!r}: {self._empty_reason(folder)}")
            v = numbers[-1] if version is None else version
            if v not in numbers:
                have = ", ".join(map(str, numbers))
                raise RequestError(404, f"model {name!r} has no version {v} (it has {have})")
            present = self._snapshot(name)
            if v == m.served and (v, m.served_content) in present:  # served, files unchanged: nothing to do
                m.settled = present
                return self.table.lookup(name).served
            # the versions present now are settled: the poller keeps this choice until another appears
            if not await self._load_and_swap(m, v, present):
                raise RequestError(400, f"failed to load {name!r} version {v}: {m.failed[v][0]}")
            return self.table.lookup(name).served

    async def unload(self, name: str) -> None:
        """Stop serving `name`; requests already holding it are answered, later ones get 404."""
        folder = self.root / name
        if name not in self.models and (not folder.is_dir() or name.startswith(".")):
            raise RequestError(404, f"no model folder {name!r} in the repository")
        m = self._model(name)
        async with self._lock(name):
            m.settled = self._snapshot(name)  # the poller loads NAME again once another version appears
            old = self.table.remove(name, "unloaded")
            m.served = None
            if old is not None:
                self.log(f"model {name}: version {old.version} unloaded")

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository extension's index: one entry per version of every model."""
        try:
            names = {p.name for p in model_dirs(self.root)}
        except OSError:  # the repository folder is gone: what is served still serves
            names = set()
        out = []
        for name in sorted(names | set(self.models)):
            m = self.models.get(name) or _Model(name)
            folder = self.root / name
            on_disk = dict(self._snapshot(name))
            present = set(on_disk) | ({m.served} if m.served else set())
            if not present:
                out.append({"name": name, "state": UNAVAILABLE, "reason": self._empty_reason(folder)})
            for v in sorted(present):
                content = on_disk.get(v)
                # READY only for the files loaded; a folder gone keeps serving what was loaded from it
                ready = v == m.served and content in (None, m.served_content)
                entry = {"name": name, "version": str(v), "state": READY if ready else UNAVAILABLE}
                if not ready:
                    if v in m.failed and m.failed[v][1] == content:
                        entry["reason"] = m.failed[v][0]
                    elif v == m.served:
                        entry["reason"] = (
                            "its files changed after it was loaded and are not loaded yet (requests are "
                            "answered by the files loaded before)"
                        )
                    else:
                        entry["reason"] = "unloaded" if v in m.history else "not loaded"
                out.append(entry)
        return [e for e in out if e["state"] == READY] if ready_only else out

    # ------------------------------------------------------------ inside

    def _model(self, name: str) -> _Model:
        return self.models.setdefault(name, _Model(name))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _content(self, name: str, v: int) -> str:
        """What identifies version `v`'s files (names, sizes, modification times), beside its number."""
        files = fingerprint(version_dir(self.root / name, v))
        return hashlib.sha256(repr(files).encode()).hexdigest()[:16] if files else ""

    def _snapshot(self, name: str) -> set[tuple[int, str]]:
        """(version, content) of every version present in the model folder now."""
        return {(v, self._content(name, v)) for v in versions(self.root / name)}

    def _candidates(self, m: _Model):
        """Versions at or above the one served, newest first, that are not settled (present, as they are now,
        when the version served was chosen), less those that failed and have not changed since."""
        for v in reversed(versions(self.root / m.name)):
            if v < (m.served or 0):
                return
            content = self._content(m.name, v)
            if (v, content) in m.settled or (v in m.failed and m.failed[v][1] == content):
                continue
            yield v

    def _public(self, reason: str) -> str:
        """A reason as clients see it: paths relative to the repository (the server's folders are its own)."""
        for root in {str(self.root.resolve()), str(self.root)}:
            reason = reason.replace(root.rstrip("/") + "/", "")
        return reason

    def _load(self, name: str, v: int) -> tuple[Served | str, float, str]:
        """(the version loaded, or why it cannot serve; seconds; its content before loading). Runs in a worker
        thread while the server serves, so the old version answers requests meanwhile. The checks run in a
        child process first (pmserve.serving.candidate), so a version that crashes ONNX Runtime is refused
        instead of killing the server."""
        path = version_dir(self.root / name, v)
        content = self._content(name, v)  # before: files that change during the load mean another try later
        start = time.perf_counter()
        result: Served | str
        try:
            crashed = self.prober.check(path, self.cfg)
            result = crashed if crashed is not None else load_bundle(path, name, self.cfg, str(v))
        except PMError as e:
            result = str(e)
        except Exception as e:  # noqa: BLE001 -- one bad version must not stop a server that serves others
            result = f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if isinstance(result, str):
            result = self._public(result)
        return result, time.perf_counter() - start, content

    def _served(self, m: _Model, v: int, content: str, present: set[tuple[int, str]]) -> None:
        """Version `v` (with `content`) serves; the versions `present` when it was chosen are settled."""
        m.served, m.served_content = v, content
        m.settled = {(n, c) for n, c in present if n != v} | {(v, content)}
        m.history.add(v)

    def _settle(self, m: _Model, v: int, result: Served | str, seconds: float, files: str) -> Served | None:
        """Record a load's outcome: the version on success, None (and the reason, logged) on failure."""
        ok = not isinstance(result, str)
        if self.metrics is not None:
            self.metrics.loads.labels(m.name, "swapped" if ok else "refused").inc()
            self.metrics.load_seconds.labels(m.name).observe(seconds)
        if ok:
            m.failed.pop(v, None)
            return result
        m.failed[v] = (result, files)
        if self.table is not None:
            self._log_refused(m, v, result)
        return None

    def _log_refused(self, m: _Model, v: int, reason: str) -> None:
        keeps = f"; version {m.served} goes on serving" if m.served else ""
        self.log(f"model {m.name}: version {v} not served: {reason}{keeps}")

    async def _load_and_swap(self, m: _Model, v: int, present: set[tuple[int, str]]) -> bool:
        result, seconds, content = await asyncio.to_thread(self._load, m.name, v)
        served = self._settle(m, v, result, seconds, content)
        if served is None:
            return False
        old = self.table.put(served)
        self._served(m, v, content, present)
        was = f" (was version {old.version})" if old is not None else ""
        self.log(f"model {m.name}: version {v} serves{was}")
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 -- a failed look (REPO gone, unreadable) must not stop serving
                self.log(
                    f"repository {self.root}: not read ({type(e).__name__}: {e}); serving what is loaded"
                )

    @staticmethod
    def _empty_reason(folder: Path) -> str:
        n = folder.name
        if is_bundle(folder):
            return f"{n} is a bundle itself, not a model folder of numbered versions (move it to {n}/1)"
        return f"no version folders in {n} (expected {n}/1, {n}/2, ...)"
