"""Model name -> the version served and what runs it (`ModelTable`): how a new version replaces the old without
dropping a request.

What runs a version: a Batcher for an encoder (classifier, embedder), an Engine for a decoder (causal-lm). A new
version replaces the old in one step; a request holds the version it looked up until it is answered (a stream
until its last token), and an old version's runner closes only when its last request is done, so a swap drops
nothing. Which versions to serve, from a model repository that changes while the server runs, is
pmserve.serving.repository's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .batcher import Batcher
from .config import ServeConfig
from .engine import Engine
from .metrics import Metrics
from .model import Served
from .protocol import RequestError


@dataclass
class Slot:
    """A served version with what runs it, and how many requests hold it right now."""

    served: Served
    runner: Batcher | Engine
    users: int = 0
    retired: bool = False
    closed: bool = False


class ModelTable:
    """Model name -> the version served and its runner. Everything here runs on the event loop, so a swap is
    one dict assignment: requests that looked up the old version keep it (and its runner) until answered, and
    the old runner closes once the last of them is done; requests that look up afterwards get the new one."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self.slots: dict[str, Slot] = {}
        self.gone: dict[str, str] = {}  # name -> why it is not served (unloaded)
        self._closing: set[asyncio.Task] = set()

    def names(self) -> list[str]:
        """Served names in the order they were first served: /predict's default is the first BUNDLE given."""
        return list(self.slots)

    def served(self) -> list[Served]:
        return [self.slots[n].served for n in self.names()]

    def lookup(self, name: str, version: str | None = None) -> Slot:
        """The slot serving `name` (and `version`, when given); 404 otherwise."""
        slot = self.slots.get(name)
        if slot is None:
            why = (
                f"model {name!r} is not loaded ({self.gone[name]})"
                if name in self.gone
                else f"unknown model {name!r}"
            )
            raise RequestError(404, f"{why}; this server has {', '.join(self.names()) or 'no models loaded'}")
        if version not in (None, "", slot.served.version):
            raise RequestError(
                404,
                f"model {name!r} has no version {version!r} served; it serves version {slot.served.version}",
            )
        return slot

    def decoders(self) -> list[str]:
        """Served names of decoders (the OpenAI routes' models), in the order they were first served."""
        return [n for n in self.names() if self.slots[n].served.causal]

    def hold(self, name: str, version: str | None = None) -> Slot:
        """The slot for one request, held until `release`: for a response that outlives its handler (a stream)."""
        slot = self.lookup(name, version)
        slot.users += 1
        return slot

    def release(self, slot: Slot) -> None:
        slot.users -= 1
        if slot.retired and not slot.users:
            self._close(slot)

    @contextmanager
    def use(self, name: str, version: str | None = None) -> Iterator[Slot]:
        """The slot for one request, held until the request is answered."""
        slot = self.hold(name, version)
        try:
            yield slot
        finally:
            self.release(slot)

    def put(self, served: Served) -> Served | None:
        """Serve `served` under its name from now on; returns the version it replaced (which finishes its own
        requests, then closes)."""
        if served.causal:
            runner = Engine(served, self.cfg, self.metrics)
        else:
            runner = Batcher(
                served, self.cfg.max_batch, self.cfg.max_wait_ms / 1000, self.metrics, self.cfg.by_length
            )
        runner.start()
        old = self.slots.get(served.name)
        self.slots[served.name] = Slot(served, runner)
        self.gone.pop(served.name, None)
        self.metrics.version.labels(served.name).set(_number(served.version))
        if old is not None:
            self._retire(old)
        return old.served if old else None

    def remove(self, name: str, why: str) -> Served | None:
        """Stop serving `name`: later requests get 404 with `why`; requests already holding it are answered."""
        old = self.slots.pop(name, None)
        self.gone[name] = why
        self.metrics.version.labels(name).set(0)
        if old is not None:
            self._retire(old)
        return old.served if old else None

    async def close(self) -> None:
        """At shutdown (in-flight requests are answered or past --drain-timeout): every batcher answers its queue
        and stops; every engine ends what still runs (cancelled) and stops."""
        for name in list(self.slots):
            slot = self.slots.pop(name)
            slot.retired = True
            self._close(slot)
        while self._closing:
            await asyncio.gather(*self._closing)

    def _retire(self, slot: Slot) -> None:
        slot.retired = True
        if not slot.users:
            self._close(slot)

    def _close(self, slot: Slot) -> None:
        if slot.closed:
            return
        slot.closed = True
        task = asyncio.get_running_loop().create_task(slot.runner.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _number(version: str) -> float:
    return float(version) if version.isdigit() else 0.0
