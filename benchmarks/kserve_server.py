"""A pmserve bundle behind KServe's Python model server (kserve.ModelServer), for benchmarks/kserve_bench.py.

    .venv-kserve/bin/python benchmarks/kserve_server.py --bundle BUNDLE --port PORT [--max-batch 32]
                                                        [--max-wait-ms 5] [--threads 0]

Runs in KServe's own environment (benchmarks/kserve_env.sh, which installs pmserve there): the model class
wraps pmserve.predict.OrtModel, the same tokenizer and ONNX Runtime session `pmserve serve` runs, and answers the
same v2 request (BYTES `text` in) with the same outputs (`label`, `scores`), so the servers differ and the
model does not.

KServe's Python server has no batching of its own (in a cluster, batching is the InferenceService's Go sidecar,
`spec.predictor.batcher`, a hop in front of this process). So there are two model classes:
- `--max-batch 1`: one synchronous model call per request, which is what kserve.Model.predict does when written
  the obvious way (KServe runs a synchronous predict on its event loop);
- `--max-batch N`: what a user writes in an afternoon: an async predict puts the texts on a queue, a task takes
  up to N inputs once the oldest has waited --max-wait-ms, and runs them as one model call in a worker thread
  (the fixed wait, padding to the longest text, one call per batch).
Every log line per request is off (no access log, no latency log), as in `pmserve serve`. --tuned adds what
pmserve serve sets besides its batcher (no spinning ONNX Runtime threads, gc.freeze after loading).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--bundle", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--max-batch", type=int, default=32)
ap.add_argument("--max-wait-ms", type=float, default=5.0)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument(
    "--tuned",
    action="store_true",
    help="The two settings `pmserve serve` makes outside its batcher: ONNX Runtime's intra-op threads do not spin "
    "between runs, and the objects loaded before serving are frozen out of the cyclic GC (gc.freeze). Default: "
    "neither, which is what a KServe model class gets unless its author knows to change them.",
)
args = ap.parse_args()
# kserve parses sys.argv when imported: give it only its own flags
sys.argv = [sys.argv[0], "--configure_logging", "false", "--enable_latency_logging", "false"]

import kserve  # noqa: E402
import numpy as np  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve.utils.utils import generate_uuid  # noqa: E402

from pmserve.predict import OrtModel  # noqa: E402


def texts_of(payload: InferRequest) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else x for x in payload.inputs[0].data]


def response(
    model: kserve.Model, payload: InferRequest, scores: np.ndarray, labels: list[str]
) -> InferResponse:
    top = [labels[k] for k in scores.argmax(1).tolist()]
    outputs = [
        InferOutput("label", [len(top)], "BYTES", top),
        InferOutput("scores", list(scores.shape), "FP32", scores.ravel().tolist()),
    ]
    return InferResponse(payload.id or generate_uuid(), model.name, outputs)  # as KServe's examples do


class OneCallPerRequest(kserve.Model):
    def __init__(self, name: str, bundle: str, threads: int):
        super().__init__(name)
        self.bundle, self.threads = bundle, threads

    def load(self) -> bool:
        self.model = OrtModel.from_bundle(self.bundle, "cpu", self.threads, spinning=not args.tuned)
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        return response(self, payload, self.model.scores(texts_of(payload)), self.model.labels)


class AfternoonBatcher(OneCallPerRequest):
    def __init__(self, name: str, bundle: str, threads: int, max_batch: int, max_wait_s: float):
        super().__init__(name, bundle, threads)
        self.max_batch, self.max_wait = max_batch, max_wait_s
        self.queue: list[tuple[list[str], asyncio.Future, float]] = []
        self.wake: asyncio.Event | None = None
        self.pool = ThreadPoolExecutor(1)

    async def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        if self.wake is None:  # the server's loop exists only now
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self.batches())
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((texts_of(payload), fut, time.perf_counter()))
        self.wake.set()
        return response(self, payload, await fut, self.model.labels)

    async def batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            while sum(len(t) for t, _, _ in self.queue) < self.max_batch:
                left = self.queue[0][2] + self.max_wait - time.perf_counter()
                if left <= 0:
                    break
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, n = [], 0
            while self.queue and (not batch or n + len(self.queue[0][0]) <= self.max_batch):
                batch.append(self.queue.pop(0))
                n += len(batch[-1][0])
            texts = [x for t, _, _ in batch for x in t]
            try:
                scores = await loop.run_in_executor(self.pool, self.model.scores, texts)
            except Exception as e:  # noqa: BLE001 -- each caller gets the error
                for _, f, _ in batch:
                    f.set_exception(e)
                continue
            k = 0
            for t, f, _ in batch:
                f.set_result(scores[k : k + len(t)])
                k += len(t)


if __name__ == "__main__":
    if args.max_batch > 1:
        model = AfternoonBatcher("m", args.bundle, args.threads, args.max_batch, args.max_wait_ms / 1000)
    else:
        model = OneCallPerRequest("m", args.bundle, args.threads)
    model.load()
    if args.tuned:
        import gc

        gc.collect()
        gc.freeze()
    kserve.ModelServer(http_port=args.port, enable_grpc=False, workers=1).start([model])
