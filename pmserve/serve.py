"""`pmserve serve`: exported bundles behind the Open Inference Protocol v2 (KServe v2 / Triton REST).

KServe's and Triton's clients already speak v2, so a bundle served here is called the same way on a laptop and
in a cluster. Requests are small and arrive concurrently, and one ONNX Runtime call on a padded batch costs far
less than one call per request, so a batcher per model gathers requests for at most --max-wait-ms (or until
--max-batch inputs) and runs them in a worker thread: the event loop goes on parsing and answering while the
model runs. A batch is padded to its longest input, so a gathered batch of texts of mixed lengths is split into
groups of similar length first (`length_groups`), one model call each. The binary tensor extension is spoken too, because tritonclient uses it by default.

Every model is loaded the same way (`load_bundle`: hashes, ONNX Runtime session, the bundle's parity probe) and
lives in the ModelTable, which maps a name to the version served and its batcher. A new version replaces the old
in one step; a request holds the version it looked up until it is answered, and an old version's batcher closes
only when its last request is done, so a swap drops nothing. Which versions to serve, from a model repository
that changes while the server runs, is pmserve.model_repository's business.

A classifier bundle answers with outputs `label` and `scores`; an embedding bundle with `embedding` FP32
[N, dim] (its metadata says which), and curl users get `POST /predict` and `POST /embed` respectively.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import io
import json
import re
import signal
import socket
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations in this namespace
from starlette.datastructures import Headers

from . import __version__
from . import defaults as D
from .errors import PMError
from .formats.bundle import read_manifest, read_probe
from .predict import PROVIDERS, OrtModel

HEADER_LENGTH = "inference-header-content-length"
IMAGE_BYTES = 16 << 20  # one encoded image; text bodies are bounded by --max-inputs x --max-text-chars
VERSION = "1"  # a bundle served as BUNDLE is one immutable model: version 1
# Export measures the probe's tolerance on the CPU. A GPU's fp32 may run matrix products in TF32 (ORT's CUDA
# provider can), whose mantissa is fp16's, so there the probe allows at least fp16's parity tolerance.
GPU_PROBE_TOL = 1e-2
# What one more model call costs, in padded tokens. On the CPU (all-MiniLM-L6-v2, 2 cores, ONNX Runtime) a call
# costs about 2.3 ms plus 0.15 ms per padded token (batch x longest input): about 16 tokens. Splitting a batch
# pays when the padding it saves exceeds this; on a GPU, where padding is nearly free, fewer splits would do,
# but a split there costs one more launch, not a wrong answer.
CALL_TOKENS = 16


@dataclass
class ServeConfig:
    """Limits and batching of a server; every field is a `pmserve serve` option."""

    max_batch: int = D.SERVE_MAX_BATCH
    max_wait_ms: float = D.SERVE_MAX_WAIT_MS
    by_length: bool = D.SERVE_BY_LENGTH
    max_inputs: int = D.SERVE_MAX_INPUTS
    max_text_chars: int = D.SERVE_MAX_TEXT_CHARS
    provider: str = D.SERVE_PROVIDER
    threads: int = D.SERVE_THREADS
    drain_s: float = D.SERVE_DRAIN_S
    poll_s: float = D.SERVE_POLL_S

    def check(self) -> None:
        for opt, value, low in (
            ("max-batch", self.max_batch, 1),
            ("max-inputs", self.max_inputs, 1),
            ("max-text-chars", self.max_text_chars, 1),
            ("max-wait-ms", self.max_wait_ms, 0),
            ("threads", self.threads, 0),
            ("drain-timeout", self.drain_s, 0),
            ("poll-s", self.poll_s, 0),
        ):
            if value < low:
                raise PMError(f"--{opt}: must be at least {low}, got {value}")
        if self.provider not in PROVIDERS:
            raise PMError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")


@dataclass
class Served:
    """One loaded bundle under its model name and version."""

    name: str
    path: Path
    model: OrtModel
    version: str = VERSION

    @property
    def kind(self) -> str:
        return self.model.input_kind

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def embedding(self) -> bool:
        return self.model.kind == "embedding"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The v2 outputs a request may ask for."""
        return ("embedding",) if self.embedding else ("label", "scores")

    def metadata(self) -> dict:
        """The v2 model metadata; `parameters.labels` names the columns of `scores` (a classifier), and
        `parameters.kind` says whether the model classifies or embeds."""
        m = self.model.manifest
        if self.embedding:
            dim = m["outputs"][0]["shape"][-1]
            outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]
            params = {"kind": "embedding", "dim": dim, "pooling": m.get("pooling")}
            params["normalize"] = bool(m.get("normalize"))
        else:
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, len(self.labels)]},
            ]
            params = {"kind": "classifier", "labels": self.labels}
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": self.kind, "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs,
            "parameters": {**params, "providers": self.model.providers},
        }


def load_bundle(path: Path, name: str, cfg: ServeConfig, version: str = VERSION) -> Served:
    """A bundle verified against its manifest's hashes, opened, and run on its parity probe (or, for a bundle
    exported before probes, run once): a bundle that cannot serve, or does not score as it did at export, is a
    PMError here, before any request reaches it."""
    path = Path(path)
    read_manifest(path)  # "not a bundle" in the bundle's words before anything else
    # checks every file's sha256; no spinning: ORT's idle threads would take the cores requests are parsed on
    model = OrtModel.from_bundle(path, cfg.provider, cfg.threads, spinning=False)
    probe = read_probe(path, model.manifest)
    if probe is None:
        inputs = ["warm up"] if model.input_kind == "text" else [np.zeros((16, 16, 3), np.uint8)]
    else:
        inputs = probe["inputs"]
    try:
        scores = model.scores(inputs)
    except Exception as e:  # noqa: BLE001 -- any failure here means the bundle cannot serve
        raise PMError(f"{path}: the model does not run ({str(e).splitlines()[0][:200]})") from None
    if probe is not None:
        if scores.shape != probe["scores"].shape:
            raise PMError(
                f"{path}: parity probe: scores of shape {list(scores.shape)}, export recorded "
                f"{list(probe['scores'].shape)}"
            )
        diff = float(np.abs(scores - probe["scores"]).max())
        tol = probe["tolerance"]
        if model.providers[0] != "CPUExecutionProvider":
            tol = max(tol, GPU_PROBE_TOL)
        if not diff <= tol:  # NaN fails too
            raise PMError(
                f"{path}: parity probe failed: max |score - export's PyTorch score| = {diff:.3g} "
                f"(tolerance {tol:g})"
            )
    return Served(name, path, model, version)


def load_models(bundles: list[Path], names: list[str], cfg: ServeConfig) -> list[Served]:
    """Every bundle loaded (`load_bundle`) before the server listens, so that a bundle that cannot serve stops
    the server rather than failing its first request."""
    cfg.check()
    if names and len(names) != len(bundles):
        raise PMError(
            f"--name: given {len(names)} times for {len(bundles)} bundles (once per bundle, or never)"
        )
    names = names or [Path(b).resolve().name for b in bundles]
    seen = set()
    for n in names:
        if not n or "/" in n or n in seen:
            raise PMError(f"--name: {n!r} is empty, has a '/', or names two bundles (use --name per bundle)")
        seen.add(n)
    return [load_bundle(Path(path), name, cfg) for path, name in zip(bundles, names)]


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of their own, so that two apps in one process never collide."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("pmserve_requests", "HTTP requests by endpoint", ["endpoint"], registry=r)
        self.errors = Counter(
            "pmserve_errors", "HTTP error answers by endpoint and status", ["endpoint", "code"], registry=r
        )
        self.latency = Histogram(
            "pmserve_request_seconds", "Request latency by endpoint", ["endpoint"], registry=r
        )
        self.batch_size = Histogram(
            "pmserve_batch_size",
            "Inputs per model call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        fine = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.queue = Histogram(
            "pmserve_queue_seconds", "Time a request waits for its batch", ["model"], buckets=fine, registry=r
        )
        self.inference = Histogram(
            "pmserve_inference_seconds", "Model call time per batch", ["model"], buckets=fine, registry=r
        )
        self.tokens = Counter(
            "pmserve_batch_tokens",
            "Token positions computed by model calls: 'padded' (batch x longest input) and 'input' (the "
            "inputs' own tokens); their ratio is the cost of padding",
            ["model", "kind"],
            registry=r,
        )
        self.queued = Gauge("pmserve_queued_inputs", "Inputs waiting for a batch", ["model"], registry=r)
        self.version = Gauge(
            "pmserve_model_version", "Version served (0: none, after an unload)", ["model"], registry=r
        )
        self.loads = Counter(
            "pmserve_model_loads",
            "Versions loaded while serving, by result: swapped in, or refused by a check",
            ["model", "result"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "pmserve_model_load_seconds",
            "Time to verify, open and probe a version before it is swapped in",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------- dynamic batching


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


# ---------------------------------------------------------------- the models being served


@dataclass
class _Slot:
    """A served version with its batcher, and how many requests hold it right now."""

    served: Served
    batcher: Batcher
    users: int = 0
    retired: bool = False
    closed: bool = False


class ModelTable:
    """Model name -> the version served and its batcher. Everything here runs on the event loop, so a swap is
    one dict assignment: requests that looked up the old version keep it (and its batcher) until answered, and
    the old batcher closes once the last of them is done; requests that look up afterwards get the new one."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self.slots: dict[str, _Slot] = {}
        self.gone: dict[str, str] = {}  # name -> why it is not served (unloaded)
        self._closing: set[asyncio.Task] = set()

    def names(self) -> list[str]:
        """Served names in the order they were first served: /predict's default is the first BUNDLE given."""
        return list(self.slots)

    def served(self) -> list[Served]:
        return [self.slots[n].served for n in self.names()]

    def lookup(self, name: str, version: str | None = None) -> _Slot:
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

    @contextmanager
    def use(self, name: str, version: str | None = None) -> Iterator[_Slot]:
        """The slot for one request, held until the request is answered."""
        slot = self.lookup(name, version)
        slot.users += 1
        try:
            yield slot
        finally:
            slot.users -= 1
            if slot.retired and not slot.users:
                self._close(slot)

    def put(self, served: Served) -> Served | None:
        """Serve `served` under its name from now on; returns the version it replaced (which finishes its own
        requests, then closes)."""
        batcher = Batcher(
            served, self.cfg.max_batch, self.cfg.max_wait_ms / 1000, self.metrics, self.cfg.by_length
        )
        batcher.start()
        old = self.slots.get(served.name)
        self.slots[served.name] = _Slot(served, batcher)
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
        and stops."""
        for name in list(self.slots):
            slot = self.slots.pop(name)
            slot.retired = True
            self._close(slot)
        while self._closing:
            await asyncio.gather(*self._closing)

    def _retire(self, slot: _Slot) -> None:
        slot.retired = True
        if not slot.users:
            self._close(slot)

    def _close(self, slot: _Slot) -> None:
        if slot.closed:
            return
        slot.closed = True
        task = asyncio.get_running_loop().create_task(slot.batcher.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _number(version: str) -> float:
    return float(version) if version.isdigit() else 0.0


# ---------------------------------------------------------------- the v2 wire format


class RequestError(Exception):
    """A request the server will not run: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def pack_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the binary tensor format: each as a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unpack_bytes(raw: bytes) -> list[bytes]:
    out, k = [], 0
    while k < len(raw):
        if k + 4 > len(raw):
            raise RequestError(400, "binary BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, k)
        if k + 4 + n > len(raw):
            raise RequestError(400, "binary BYTES tensor: an element runs past the data")
        out.append(raw[k + 4 : k + 4 + n])
        k += 4 + n
    return out


def _flatten(data) -> list:
    """v2 allows tensor data as a flat row-major list or nested lists of the tensor's shape."""
    if not isinstance(data, list):
        return [data]
    return [x for d in data for x in _flatten(d)]


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header of an infer request and the binary data after it (the binary tensor extension)."""
    rest = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(
                400, f"Inference-Header-Content-Length: not an integer: {header_length!r}"
            ) from None
        if not 0 < n <= len(body):
            raise RequestError(
                400, f"Inference-Header-Content-Length: {n} is outside the {len(body)}-byte body"
            )
        body, rest = body[:n], body[n:]
    req = parse_json(body)
    if not isinstance(req, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return req, rest


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None


def infer_elements(req: dict, binary: bytes, input_name: str, max_inputs: int) -> list:
    """The elements of the one input tensor, checked against the protocol: name, datatype BYTES, shape [N]."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, f"'inputs': expected a list of one tensor named {input_name!r}")
    t = inputs[0]
    if t.get("name") != input_name:
        raise RequestError(400, f"input {t.get('name')!r}: the model takes one input named {input_name!r}")
    if t.get("datatype") != "BYTES":
        raise RequestError(400, f"input {input_name!r}: datatype must be BYTES, got {t.get('datatype')!r}")
    shape = t.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise RequestError(400, f"input {input_name!r}: shape must be [N] with N >= 1, got {shape!r}")
    if shape[0] > max_inputs:
        raise RequestError(
            413, f"input {input_name!r}: {shape[0]} inputs, more than --max-inputs {max_inputs}"
        )
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"input {input_name!r}: 'parameters' must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise RequestError(
                400, f"input {input_name!r}: binary_data_size {size!r}, but {len(binary)} bytes follow"
            )
        elements = unpack_bytes(binary)
    elif "data" in t:
        elements = _flatten(t["data"])
    else:
        raise RequestError(400, f"input {input_name!r}: no 'data' and no binary_data_size")
    if len(elements) != shape[0]:
        raise RequestError(400, f"input {input_name!r}: shape {shape} but {len(elements)} elements")
    return elements


def requested_outputs(req: dict, names: tuple[str, ...] = ("label", "scores")) -> list[tuple[str, bool]]:
    """(name, as binary) of each output asked for; all of the model's `names` when the request names none."""
    params = req.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outs = req.get("outputs")
    if outs is None:
        return [(n, default) for n in names]
    if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
        raise RequestError(400, "'outputs': expected a list of objects")
    out = []
    for o in outs:
        if o.get("name") not in names:
            has = " and ".join(repr(n) for n in names)
            raise RequestError(
                400, f"output {o.get('name')!r}: the model has output{'s' * (len(names) > 1)} {has}"
            )
        p = o.get("parameters") or {}
        if isinstance(p, dict) and p.get("classification"):
            raise RequestError(400, f"output {o['name']!r}: the classification extension is not supported")
        out.append((o["name"], bool(p.get("binary_data", default)) if isinstance(p, dict) else default))
    return out


def infer_response(served: Served, req: dict, scores: np.ndarray) -> tuple[dict, bytes]:
    """The v2 response header and the binary data that follows it (empty when every output is JSON).
    `scores` is the model's output: class scores, or embeddings for an embedding model."""
    labels = [] if served.embedding else [served.labels[i] for i in scores.argmax(1).tolist()]
    outputs, chunks = [], []
    for name, binary in requested_outputs(req, served.outputs):
        if name == "label":
            t = {"name": "label", "datatype": "BYTES", "shape": [len(labels)]}
            raw = pack_bytes([x.encode() for x in labels]) if binary else None
            data = labels
        else:
            t = {"name": name, "datatype": "FP32", "shape": list(scores.shape)}
            raw = scores.astype("<f4").tobytes() if binary else None
            data = scores.ravel().tolist()
        if binary:
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            t["data"] = data
        outputs.append(t)
    head = {"model_name": served.name, "model_version": served.version, "outputs": outputs}
    if "id" in req:
        head["id"] = req["id"]
    return head, b"".join(chunks)


def model_inputs(served: Served, elements: list, max_text_chars: int) -> list:
    """Protocol elements -> what the model's preprocessor takes: texts, or decoded RGB arrays for images.
    JSON carries an image as base64 text; the binary extension carries its encoded bytes as they are."""
    out = []
    for i, x in enumerate(elements):
        if served.kind == "text":
            if isinstance(x, bytes):
                try:
                    x = x.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(400, f"input {i}: not UTF-8 text") from None
            if not isinstance(x, str):
                raise RequestError(400, f"input {i}: expected a string, got {type(x).__name__}")
            if len(x) > max_text_chars:
                raise RequestError(
                    413, f"input {i}: {len(x)} characters, more than --max-text-chars {max_text_chars}"
                )
            out.append(x)
        else:
            out.append(_decode_image(x, i))
    return out


def _decode_image(x, i: int) -> np.ndarray:
    from PIL import Image

    if isinstance(x, str):
        try:
            x = base64.b64decode(x, validate=True)
        except ValueError:
            raise RequestError(400, f"input {i}: not base64 (JSON carries images as base64 text)") from None
    if not isinstance(x, bytes):
        raise RequestError(400, f"input {i}: expected encoded image bytes, got {type(x).__name__}")
    if len(x) > IMAGE_BYTES:
        raise RequestError(413, f"input {i}: {len(x)} bytes, more than {IMAGE_BYTES} per image")
    try:
        with Image.open(io.BytesIO(x)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"input {i}: not a readable image ({e})") from None


# ---------------------------------------------------------------- the HTTP app


class _MetricsMiddleware:
    """Counts requests, errors and latency by route template (not raw path: model names stay low-cardinality
    and a scan of random URLs does not grow the metrics)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            self.metrics.requests.labels(endpoint).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()


class _InferRoute:
    """POST /v2/models/NAME[/versions/V]/infer as a bare ASGI handler in front of FastAPI's router.

    Why: on short texts the event loop's work per request, not the model, bounds throughput (BENCHMARKS.md,
    serving against KServe): FastAPI's routing, request object and endpoint machinery cost more than the
    protocol's own parsing. The handler is the same functions FastAPI's routes use (read_body, the v2 parsers,
    the batcher); errors are answered as the app's exception handlers answer them, and the metrics middleware
    sees the route template as for any other route.
    """

    def __init__(self, app, handler):
        self.app, self.handler = app, handler

    async def __call__(self, scope, receive, send):
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            return await self.app(scope, receive, send)
        name, version = match.groups()
        scope["route"] = _Template(INFER_TEMPLATES[version is not None])
        headers = {}
        if scope["method"] != "POST":
            status, body, headers = 405, _json({"error": "Method Not Allowed"}), {"allow": "POST"}
        else:
            try:
                status, body, headers = 200, *await self.handler(name, version, receive, Headers(scope=scope))
            except RequestError as e:
                status, body = e.status, _json({"error": str(e)})
            except Exception as e:  # noqa: BLE001 -- answered as the app's handler for the others answers
                status, body = 500, _json({"error": internal_error(e)})
        headers.setdefault("content-type", "application/json")
        raw = [(b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
INFER_TEMPLATES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


@dataclass(frozen=True)
class _Template:
    path: str  # what the metrics middleware labels a request by, as it reads a Starlette route's


def internal_error(e: Exception) -> str:
    """What a 500 answer says."""
    return f"internal error: {type(e).__name__}: {e}"


def _json(content) -> bytes:
    """JSON as Starlette's JSONResponse writes it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def create_app(models: list[Served], cfg: ServeConfig, repository=None):
    """The FastAPI app serving `models` (already loaded); batchers start and drain with its lifespan. With a
    `repository` (pmserve.model_repository.Repository) the models change while it serves: the repository
    extension's endpoints are added and the repository polls for new versions."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    table = ModelTable(cfg, metrics)
    state = {"ready": False}

    def body_limit() -> int:
        """Bytes a request body may have: images need more than texts (the models served can change)."""
        images = any(s.kind != "text" for s in table.served())
        return cfg.max_inputs * max(4 * cfg.max_text_chars + 16, IMAGE_BYTES if images else 0) + (1 << 16)

    @asynccontextmanager
    async def lifespan(app):
        for s in models:
            table.put(s)
        if repository is not None:
            repository.start(table, metrics)
        state["ready"] = True
        yield
        state["ready"] = False  # uvicorn has stopped accepting and waited for in-flight requests
        if repository is not None:
            await repository.stop()
        await table.close()

    app = FastAPI(title="pmserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return JSONResponse({"error": f"bad request: {e.errors()}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        return JSONResponse({"error": internal_error(e)}, status_code=500)

    async def read_body(receive, headers) -> bytes:
        """The body, refused past the limits' size while it streams in, and un-gzipped when it came so."""
        chunks, n, max_body = [], 0, body_limit()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away before its request body arrived")
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > max_body:
                raise RequestError(
                    413, f"request body over {max_body} bytes (see --max-inputs, --max-text-chars)"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):
            d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
            try:
                body = d.decompress(body, max_body)
            except zlib.error as e:
                raise RequestError(400, f"Content-Encoding {encoding}: corrupt ({e})") from None
            if d.unconsumed_tail:
                raise RequestError(413, f"request body over {max_body} bytes once decompressed")
        elif encoding != "identity":
            raise RequestError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        return body

    async def scores_for(slot: _Slot, elements: list) -> np.ndarray:
        served = slot.served
        if served.kind == "text":
            inputs = model_inputs(served, elements, cfg.max_text_chars)
        else:  # decoding images takes milliseconds each: not on the event loop
            inputs = await asyncio.to_thread(model_inputs, served, elements, cfg.max_text_chars)
        return await slot.batcher.infer(inputs)

    @app.get("/v2")
    async def server_metadata():
        extensions = ["binary_tensor_data"] + (["model_repository"] if repository is not None else [])
        return {"name": "pmserve", "version": __version__, "extensions": extensions}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return table.lookup(name, version).served.metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        table.lookup(name, version)
        return JSONResponse(
            {"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503
        )

    async def infer(name: str, version: str | None, receive, headers) -> tuple[bytes, dict[str, str]]:
        """One v2 infer request (served by _InferRoute): the response body and its headers."""
        with table.use(name, version) as slot:  # this request is answered by the version it looked up
            req, binary = parse_infer_request(await read_body(receive, headers), headers.get(HEADER_LENGTH))
            elements = infer_elements(req, binary, slot.served.kind, cfg.max_inputs)
            requested_outputs(req, slot.served.outputs)  # a bad 'outputs' is a 400 before the model runs
            head, tail = infer_response(slot.served, req, await scores_for(slot, elements))
        if not tail:
            return _json(head), {}
        raw = json.dumps(head).encode()
        return raw + tail, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(raw))}

    app.add_middleware(_InferRoute, handler=infer)
    # added last, so outside _InferRoute: it counts those requests too
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def plain_request(req) -> list:
        """The inputs of a /predict or /embed body, checked."""
        if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
            raise RequestError(400, 'expected {"inputs": [text, ...]} with at least one input')
        if len(req["inputs"]) > cfg.max_inputs:
            raise RequestError(413, f"{len(req['inputs'])} inputs, more than --max-inputs {cfg.max_inputs}")
        return req["inputs"]

    def plain_model(req: dict, embedding: bool) -> str:
        """The model a /predict (classifier) or /embed (embedding) request names, else the first of its kind."""
        if "model" in req:
            return str(req["model"])
        first = [s.name for s in table.served() if s.embedding == embedding]
        return first[0] if first else (table.names() or [""])[0]

    @app.post("/predict")
    async def predict(request: Request):
        """For curl: {"inputs": [...], "model": NAME (optional)} -> the top label and score of each input."""
        req = parse_json(await read_body(request.receive, request.headers))
        inputs = plain_request(req)
        with table.use(plain_model(req, embedding=False)) as slot:
            served = slot.served
            if served.embedding:
                raise RequestError(400, f"model {served.name!r} is an embedding model: POST /embed")
            scores = await scores_for(slot, inputs)
        top = scores.argmax(1).tolist()
        return {
            "model": served.name,
            "predictions": [
                {"label": served.labels[k], "score": float(s[k])} for k, s in zip(top, scores.tolist())
            ],
        }

    @app.post("/embed")
    async def embed(request: Request):
        """For curl: {"inputs": [...], "model": NAME (optional)} -> {"embeddings": [[...], ...]}, one per input."""
        req = parse_json(await read_body(request.receive, request.headers))
        inputs = plain_request(req)
        with table.use(plain_model(req, embedding=True)) as slot:
            served = slot.served
            if not served.embedding:
                raise RequestError(400, f"model {served.name!r} is a classifier: POST /predict")
            rows = await scores_for(slot, inputs)
        return {"model": served.name, "embeddings": rows.tolist()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if repository is not None:
        repository.add_routes(app)
    app.state.metrics, app.state.table = metrics, table
    return app


# ---------------------------------------------------------------- running it


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error before anything starts."""
    try:
        family, kind, proto = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0][:3]
        # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it Nagle holds every
        # response body until the client's delayed ACK, 40 ms later, on keep-alive connections
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise PMError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(
    bundles: list[Path],
    names: list[str],
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] = print,
    repository: Path | None = None,
) -> None:
    """Load and verify every bundle (or the latest good version of every model in `repository`), then serve
    until SIGTERM or SIGINT: stop accepting, let in-flight requests finish (at most cfg.drain_s seconds), drain
    the batchers, return."""
    import uvicorn

    cfg.check()
    repo = None
    if repository is not None:
        if bundles or names:
            raise PMError(
                "--repository: serves the models in REPO; give it without BUNDLE arguments and --name"
            )
        from .model_repository import Repository

        repo = Repository(Path(repository), cfg, log)
        models = repo.load_all()
    elif not bundles:
        raise PMError("BUNDLE: give one or more bundles, or --repository REPO")
    else:
        models = load_models(bundles, names, cfg)
    sock = listen(host, port)
    app = create_app(models, cfg, repo)
    # torch, transformers and the models leave some 400k objects for the cyclic GC; a full collection walks them
    # all (0.15 to 0.3 s on 2 CPU cores), a pause that every request in flight pays: it was the p99 under load
    # (250 ms against a p50 of 60). Loaded once, they live as long as the server: move them out of the collector's
    # sight. (A model repository's first versions, once swapped out, are freed by reference counting; only
    # reference cycles among them stay.)
    gc.collect()
    gc.freeze()
    for s in models:
        what = "embedding" if s.embedding else f"{len(s.labels)} classes"
        log(f"model {s.name}: {s.path} ({s.kind}, {what}, {', '.join(s.model.providers)})")
    bound = sock.getsockname()[1]
    log(f"listening on http://{host}:{bound} (Open Inference Protocol v2 at /v2, metrics at /metrics)")
    if repo is not None:
        every = f"every {cfg.poll_s:g} s" if cfg.poll_s else "never (--poll-s 0): load through /v2/repository"
        log(f"repository {repository}: looking for new versions {every}")
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=cfg.drain_s,
        lifespan="on",
    )
    # uvicorn re-raises the signal it stopped for once it has drained; a drained SIGTERM is a clean stop, so
    # let it reach a handler that does nothing instead of the default one that kills the process.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log("stopped: in-flight requests answered")
