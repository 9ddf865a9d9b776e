"""Dynamic batching for one model (`Batcher`): concurrent requests gathered into padded model calls.

Requests are small and arrive concurrently, and one ONNX Runtime call on a padded batch costs far less than one call
per request, so a batcher per model gathers requests for at most --max-wait-ms (or until --max-batch inputs) and
runs them in a worker thread: the event loop goes on parsing and answering while the model runs. A batch is padded
to its longest input, so a gathered batch of texts of mixed lengths is split into groups of similar length first
(`length_groups`), one model call each. The batcher knows nothing of HTTP: it takes model inputs and returns
scores (a decoder's generation engine, pmserve.serving.engine, sits beside it).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import Metrics
from .model import Served
from .protocol import RequestError

# What one more model call costs, in padded tokens. On the CPU (all-MiniLM-L6-v2, 2 cores, ONNX Runtime) a call
# costs about 2.3 ms plus 0.15 ms per padded token (batch x longest input): about 16 tokens. Splitting a batch
# pays when the padding it saves exceeds this; on a GPU, where padding is nearly free, fewer splits would do,
# but a split there costs one more launch, not a wrong answer.
CALL_TOKENS = 16


def length_groups(lengths: list[int], call_tokens: float = CALL_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups, shortest group first, that minimise the cost of running each group as one
    padded model call: sum over groups of (call_tokens + size x longest length in the group).

    Sorted by length, an optimal grouping takes contiguous runs (swapping a long input into a group of short ones
    never lowers a maximum), and it never splits equal lengths (that only adds call_tokens), so a dynamic
    programme over the distinct lengths finds it exactly: best[j] = min over i < j of best[i] + call_tokens +
    (inputs with the i-th to (j-1)-th distinct length) x (the (j-1)-th distinct length). O(distinct^2), and
    distinct lengths are at most the tokenizer's max_length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    per_value = collections.Counter(lengths)
    values = sorted(per_value)
    count = [0] * (len(values) + 1)  # count[j]: inputs with one of the first j distinct lengths
    for j, v in enumerate(values):
        count[j + 1] = count[j] + per_value[v]
    best, cut = [0.0] + [float("inf")] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            c = best[i] + call_tokens + (count[j] - count[i]) * values[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], len(values)
    while j > 0:
        bounds.append((count[cut[j]], count[j]))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


@dataclass
class _Job:
    inputs: list
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers one model's concurrent requests into batches of at most `max_batch` inputs, waiting at most
    `max_wait_s` after the oldest request arrived, and runs each batch in a worker thread; each caller gets
    back its own rows.

    A model call is padded to its longest input, and on a CPU a padded token costs as much as a real one, so
    with `by_length` a gathered batch of texts is split into groups of similar token counts (`length_groups`),
    each one model call, shortest first; a caller is answered as soon as its own rows are scored. Without it (or
    for images, all of one size) the batch is one call. The batch is tokenized once (`model.encode`), and each
    call pads its own rows from that (`model.score_rows`).

    The wait only pays under concurrency, so it adapts: after a batch that held a single request with nothing
    else queued, the next request runs at once (a lone client does not pay max_wait_s per call); as soon as
    requests queue up together again (they arrived while the model was busy), batches wait again.
    """

    def __init__(
        self, served: Served, max_batch: int, max_wait_s: float, metrics: Metrics, by_length: bool = True
    ):
        self.served, self.max_batch, self.max_wait = served, max_batch, max_wait_s
        self.metrics, self.by_length = metrics, by_length
        self.pending: deque[_Job] = deque()
        self.pending_inputs = 0
        self.closing = False
        self.company = True  # whether the last batch had company: only then wait for more
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{served.name}")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.served.name}")

    async def infer(self, inputs: list) -> np.ndarray:
        """Scores [len(inputs), classes]. A request larger than max_batch is split so that no call exceeds it."""
        if self.closing:
            raise RequestError(503, "the server is shutting down")
        loop = asyncio.get_running_loop()
        jobs = [
            _Job(inputs[k : k + self.max_batch], loop.create_future())
            for k in range(0, len(inputs), self.max_batch)
        ]
        for job in jobs:
            self.pending.append(job)
            self.pending_inputs += len(job.inputs)
        # inc/dec, not set: across a swap two batchers of one model share the gauge
        self.metrics.queued.labels(self.served.name).inc(len(inputs))
        self._wake.set()
        parts = await asyncio.gather(*(j.future for j in jobs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def close(self) -> None:
        """Finish every queued request, then stop the worker thread."""
        self.closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self.executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self.closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            deadline = self.pending[0].queued + (self.max_wait if self.company else 0.0)
            while self.pending_inputs < self.max_batch and not self.closing:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            jobs = self._take()
            self.company = len(jobs) > 1 or bool(self.pending)
            await self._run(jobs, loop)

    def _take(self) -> list[_Job]:
        """The oldest jobs that fit in one batch (the first always does: requests are split to max_batch)."""
        jobs, n, taken = [], 0, 0
        while self.pending and n + len(self.pending[0].inputs) <= self.max_batch:
            job = self.pending.popleft()
            taken += len(job.inputs)
            if not job.future.done():  # a caller that went away is not scored
                jobs.append(job)
                n += len(job.inputs)
        self.pending_inputs -= taken
        self.metrics.queued.labels(self.served.name).dec(taken)
        return jobs

    def _plan(self, encoded, n: int) -> tuple[list[list[int]], list[int]]:
        """(groups of row indices, one model call each; the rows' lengths before padding)."""
        lengths = self.served.model.lengths(encoded)
        if not self.by_length or n == 1:
            return [list(range(n))], lengths
        return length_groups(lengths), lengths

    async def _run(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        """Score one batch in the worker thread: the plan and every call in one hand-over, so the model never
        waits for the event loop between its calls; each caller is answered (on the loop) as soon as its own
        rows are scored."""
        if not jobs:
            return
        start = time.perf_counter()
        for j in jobs:
            self.metrics.queue.labels(self.served.name).observe(start - j.queued)
        try:
            await loop.run_in_executor(self.executor, self._score, jobs, loop)
        except Exception as e:  # noqa: BLE001 -- a fault outside the model calls: no caller is left waiting
            self._fail(jobs, range(len(jobs)), e)

    def _score(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        """Runs in the worker thread. Futures are only touched on the loop (`call_soon_threadsafe`)."""
        name, m = self.served.name, self.metrics
        inputs = [x for j in jobs for x in j.inputs]
        owner = [k for k, j in enumerate(jobs) for _ in j.inputs]  # row -> the job it belongs to
        first = [0] * len(jobs)  # the job's first row
        for k in range(1, len(jobs)):
            first[k] = first[k - 1] + len(jobs[k - 1].inputs)
        left = [len(j.inputs) for j in jobs]  # rows of each job not scored yet
        failed: set[int] = set()
        model = self.served.model
        try:  # every input is tokenized once; each call pads its own rows
            encoded = model.encode(inputs)
            groups, lengths = self._plan(encoded, len(inputs))
        except Exception as e:  # noqa: BLE001 -- the callers answer 500 with it; the server goes on
            loop.call_soon_threadsafe(self._fail, jobs, range(len(jobs)), e)
            return
        # a text of no tokens: a call padded to 0 tokens fails, so those requests are refused
        if 0 in lengths:
            failed |= {owner[i] for i, n in enumerate(lengths) if n == 0}
            why = RequestError(400, "an input has no tokens once tokenized (an empty text?)")
            loop.call_soon_threadsafe(self._fail, jobs, set(failed), why)
        out = None
        for group in groups:
            # failed or gone: not scored (done() read from this thread is only a hint; _answer checks again)
            group = [i for i in group if owner[i] not in failed and not jobs[owner[i]].future.done()]
            if not group:
                continue
            call_start = time.perf_counter()
            try:
                scores = model.score_rows(encoded, group)
            except Exception as e:  # noqa: BLE001 -- the callers answer 500 with it; the server goes on
                which = {owner[i] for i in group}
                failed |= which
                loop.call_soon_threadsafe(self._fail, jobs, which, e)
                continue
            m.inference.labels(name).observe(time.perf_counter() - call_start)
            m.batch_size.labels(name).observe(len(group))
            m.tokens.labels(name, "padded").inc(len(group) * max(lengths[i] for i in group))
            m.tokens.labels(name, "input").inc(sum(lengths[i] for i in group))
            if out is None:
                out = np.empty((len(inputs), *scores.shape[1:]), scores.dtype)
            out[group] = scores
            done = []
            for i in group:
                k = owner[i]
                left[k] -= 1
                if not left[k]:
                    done.append((jobs[k].future, out[first[k] : first[k] + len(jobs[k].inputs)]))
            if done:
                loop.call_soon_threadsafe(self._answer, done)

    @staticmethod
    def _answer(done: list[tuple[asyncio.Future, np.ndarray]]) -> None:
        for future, rows in done:
            if not future.done():
                future.set_result(rows)

    @staticmethod
    def _fail(jobs: list[_Job], which, e: Exception) -> None:
        for k in which:
            if not jobs[k].future.done():
                jobs[k].future.set_exception(e)
