"""The generation engine of a decoder (causal-lm) bundle: one thread that owns the ONNX Runtime session and one
DecodeBatch, and batches at the iteration level (pmserve.generation's module docstring says how).

Why a thread of its own: a decode step is a blocking ORT call of milliseconds, and the batch must be touched by
one owner only. The event loop hands requests in (`submit`, which applies the limits and answers 4xx at once) and
gets each request's text deltas back through its own asyncio queue (`call_soon_threadsafe`). Between two steps the
engine takes every arrival into the batch; a request that ends or whose client goes away (`Stream.cancel`) leaves
it before the next step, so its slot is free at once. Nothing here knows HTTP: the routes are
pmserve.serving.generate_routes'.
"""

from __future__ import annotations

import asyncio
import threading
import time

from ..errors import PMError
from ..generation import DecodeBatch, Generator, SamplingParams, Sequence
from .config import ServeConfig
from .metrics import Metrics
from .model import Served
from .protocol import RequestError


class Stream:
    """One request's view of its sequence: iterate it for text deltas (async); `seq.finish_reason` once done;
    `error` when the engine failed it."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop, submitted: float):
        self.seq = seq
        self.submitted = submitted
        self.error: str | None = None
        self._loop = loop
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()

    def put(self, item: str | None) -> None:
        """From the engine thread: a text delta, or None at the end."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def cancel(self) -> None:
        """The client went away: the engine drops the sequence before its next step."""
        self.seq.cancel()

    async def __aiter__(self):
        while (item := await self._queue.get()) is not None:
            yield item
        if self.error is not None:
            raise RequestError(500, self.error)

    async def text(self) -> str:
        return "".join([d async for d in self])


class Engine:
    """A decoder served by one engine thread: what a ModelTable slot runs a causal-lm version with (a Batcher
    runs an encoder's). `start` when the version starts serving, `close` once its last request is answered."""

    def __init__(self, served: Served, cfg: ServeConfig, metrics: Metrics | None = None):
        self.served, self.cfg, self.metrics = served, cfg, metrics
        self.gen: Generator = served.model
        self.name = served.name
        self.active = 0  # sequences admitted and not yet finished (queued or in the batch)
        self._arrivals: list[Stream] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pmserve-engine-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the thread; whatever still runs ends as cancelled (requests have been answered or drained)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def submit(self, prompt_ids: list[int], params: SamplingParams, ignore_eos: bool = False) -> Stream:
        """A new request's stream, after the limits: 400 for a bad or too long request, 429 when
        --max-sequences run already. Call on the event loop."""
        cfg = self.cfg
        try:
            params.validate()
        except PMError as e:
            raise RequestError(400, str(e).removeprefix("--")) from None
        if not prompt_ids:
            raise RequestError(400, "the prompt is empty after tokenisation")
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most {cfg.max_prompt_tokens}",
            )
        if params.max_new_tokens > cfg.max_new_tokens:
            raise RequestError(
                400, f"max_tokens {params.max_new_tokens} is over this server's limit ({cfg.max_new_tokens})"
            )
        eos = () if ignore_eos else self.gen.eos_ids
        seq = Sequence(prompt_ids, params, self.gen.tokenizer, eos)
        stream = Stream(seq, asyncio.get_running_loop(), time.perf_counter())
        with self._cond:
            if self._closed:
                raise RequestError(503, "the server is shutting down")
            if self.active >= cfg.max_sequences:
                raise RequestError(
                    429, f"{cfg.max_sequences} sequences are running (--max-sequences): retry later"
                )
            self.active += 1
            self._arrivals.append(stream)
            self._cond.notify()
        if self.metrics is not None:
            self.metrics.active.labels(self.name).inc()
        return stream

    def _run(self) -> None:
        batch = DecodeBatch(self.gen.decoder, self.gen.pad_id)
        running: dict[int, Stream] = {}
        while True:
            with self._cond:
                while not self._arrivals and not running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                new, self._arrivals = self._arrivals, []
            for s in new:
                running[id(s.seq)] = s
            try:  # the arrivals' first tokens go out before the step: a step's wait is not their TTFT
                self._deliver(batch.add([s.seq for s in new if not s.seq.finished]), running)
                self._deliver(batch.step(), running)
            except Exception as e:  # noqa: BLE001 -- every request running is answered, the engine goes on
                for s in running.values():
                    s.error = f"generation failed: {type(e).__name__}: {e}"
                    s.seq.cancel()
                batch = DecodeBatch(self.gen.decoder, self.gen.pad_id)
                self._deliver([], running)
        for s in list(running.values()) + self._arrivals:
            s.seq.cancel()
            running[id(s.seq)] = s
        self._deliver([], running)

    def _deliver(self, events: list[tuple[Sequence, str]], running: dict[int, Stream]) -> None:
        """Each delta to its stream; each finished sequence's stream ended, its slot freed and counted."""
        m = self.metrics
        now = time.perf_counter()
        for seq, delta in events:
            s = running[id(seq)]
            if m is not None and len(seq.tokens) == 1:
                m.ttft.labels(self.name).observe(now - s.submitted)
            if delta:
                s.put(delta)
        if m is not None and events:
            m.generated.labels(self.name).inc(len(events))
            m.batch_size.labels(self.name).observe(len(events))
        for key in [k for k, s in running.items() if s.seq.finished]:
            s = running.pop(key)
            s.put(None)
            if m is not None:
                m.prompt_tokens.labels(self.name).inc(len(s.seq.prompt_ids))
                m.finished.labels(self.name, s.seq.finish_reason).inc()
            with self._cond:
                self.active -= 1
            if m is not None:  # inc/dec, not set: across a swap two versions' engines share the gauge
                m.active.labels(self.name).dec()
