"""The HTTP app (`create_app`): the v2 endpoints (KServe v2 / Triton REST), /predict and /embed for curl, the
repository extension when a repository is handed in, /metrics, and the server's lifespan.

Everything long-lived is built by the command and handed in (the models already loaded, the repository); the app
builds the ModelTable the batchers and engines live in and wires the routes to it. The routes only translate: the
protocol's parsing and encoding are pmserve.serving.protocol's, the batching pmserve.serving.batcher's (encoders)
and pmserve.serving.engine's (decoders, whose routes are pmserve.serving.generate_routes').
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations in this namespace
from starlette.datastructures import Headers

from .. import __version__
from .access import Access
from .config import ServeConfig
from .generate_routes import generation_routes
from .inputs import model_inputs
from .metrics import Metrics
from .model import Served
from .model_table import ModelTable, Slot
from .protocol import (
    HEADER_LENGTH,
    READY,
    SMALL_BODY,
    UNAVAILABLE,
    RequestError,
    infer_elements,
    infer_response,
    internal_error,
    json_bytes,
    parse_infer_request,
    parse_json,
    plain_inputs,
    requested_outputs,
    version_param,
)


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
            status, body, headers = 405, json_bytes({"error": "Method Not Allowed"}), {"allow": "POST"}
        else:
            try:
                status, body, headers = 200, *await self.handler(name, version, receive, Headers(scope=scope))
            except RequestError as e:
                status, body = e.status, json_bytes({"error": str(e)})
            except Exception as e:  # noqa: BLE001 -- answered as the app's handler for the others answers
                status, body = 500, json_bytes({"error": internal_error(e)})
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


def create_app(models: list[Served], cfg: ServeConfig, repository=None, loopback: bool = False):
    """The FastAPI app serving `models` (already loaded, encoders and decoders); their batchers and engines start
    and drain with its lifespan. With a
    `repository` (pmserve.serving.repository.Repository, built by the command) the models change while it serves:
    the repository extension's endpoints are added and the repository polls for new versions. `loopback`: the
    server listens on a loopback address only, where loading and unloading need no --admin-key
    (pmserve.serving.access)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    table = ModelTable(cfg, metrics)
    state = {"ready": False}

    def plain_body_limit() -> int:
        """/predict and /embed name their model in the body: the largest limit of the kinds served (the text
        limit unless an image model serves; the models served can change)."""
        return max(cfg.body_limit(k) for k in {"text", *(s.kind for s in table.served())})

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

    async def read_body(receive, headers, max_body: int) -> bytes:
        """The body, refused past `max_body` bytes while it streams in or once it has taken --body-timeout-s,
        and un-gzipped when it came so. Read before a request holds a model version: a slow client holds only
        its own bytes."""
        body = await read_limited(receive, max_body, cfg.body_timeout_s)
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # a few kilobytes may inflate to the limit: not on the event loop
            return await asyncio.to_thread(inflate, body, encoding, max_body)
        if encoding != "identity":
            raise RequestError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        return body

    async def scores_for(slot: Slot, elements: list) -> np.ndarray:
        served = slot.served
        if served.causal:
            raise RequestError(
                400,
                f"model {served.name!r} is a decoder (causal-lm): POST /v2/models/{served.name}/generate or "
                "/v1/completions",
            )
        if served.kind == "text":
            inputs = model_inputs(served, elements, cfg)
        else:  # decoding images takes milliseconds each: not on the event loop
            inputs = await asyncio.to_thread(model_inputs, served, elements, cfg)
        return await slot.runner.infer(inputs)

    @app.get("/v2")
    async def server_metadata():
        extensions = ["binary_tensor_data", "generate"]
        extensions += ["model_repository"] if repository is not None else []
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
        served = table.lookup(name, version).served
        meta = served.metadata()
        if served.causal:  # what a request may ask of it here
            meta["parameters"].update(
                max_prompt_tokens=cfg.max_prompt_tokens,
                max_new_tokens=cfg.max_new_tokens,
                max_sequences=cfg.max_sequences,
            )
        return meta

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        table.lookup(name, version)
        return JSONResponse(
            {"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503
        )

    async def infer(name: str, version: str | None, receive, headers) -> tuple[bytes, dict[str, str]]:
        """One v2 infer request (served by _InferRoute): the response body and its headers."""
        # the body first, bounded by the limit of the model's kind, without holding the version
        body = await read_body(receive, headers, cfg.body_limit(table.lookup(name, version).served.kind))
        if len(body) > PARSE_ON_LOOP:  # parsing megabytes takes milliseconds: not on the event loop
            req, binary = await asyncio.to_thread(parse_infer_request, body, headers.get(HEADER_LENGTH))
        else:
            req, binary = parse_infer_request(body, headers.get(HEADER_LENGTH))
        del body
        with table.use(name, version) as slot:  # this request is answered by the version it looked up
            if slot.served.causal:
                await scores_for(slot, [])  # the decoder's 400
            elements = infer_elements(req, binary, slot.served.kind, cfg.max_inputs)
            requested_outputs(req, slot.served.outputs)  # a bad 'outputs' is a 400 before the model runs
            head, tail = infer_response(slot.served, req, await scores_for(slot, elements))
        if not tail:
            return json_bytes(head), {}
        raw = json.dumps(head).encode()
        return raw + tail, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(raw))}

    app.add_middleware(_InferRoute, handler=infer)
    if cfg.api_key is not None or repository is not None:  # else there is nothing to refuse: no layer to pass
        app.add_middleware(Access, cfg=cfg, loopback=loopback)  # outside _InferRoute: before any body is read
    # added last, so outside the others: it counts those requests too
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    def plain_model(req: dict, embedding: bool) -> str:
        """The model a /predict (classifier) or /embed (embedding) request names, else the first of its kind."""
        if "model" in req:
            return str(req["model"])
        first = [s.name for s in table.served() if s.embedding == embedding and not s.causal]
        return first[0] if first else (table.names() or [""])[0]

    async def plain_rows(request: Request, embedding: bool) -> tuple[Served, np.ndarray]:
        """A /predict (classifier) or /embed (embedding) request's model and its output rows."""
        req = parse_json(await read_body(request.receive, request.headers, plain_body_limit()))
        inputs = plain_inputs(req, cfg.max_inputs)
        with table.use(plain_model(req, embedding)) as slot:
            served = slot.served
            if served.embedding != embedding and not served.causal:
                what, other = ("a classifier", "/predict") if embedding else ("an embedding model", "/embed")
                raise RequestError(400, f"model {served.name!r} is {what}: POST {other}")
            return served, await scores_for(slot, inputs)

    @app.post("/predict")
    async def predict(request: Request):
        """For curl: {"inputs": [...], "model": NAME (optional)} -> the answer (top label, or `<out of scope>`)
        and top score of each input, and its fit where the model rejects by fit."""
        served, rows = await plain_rows(request, embedding=False)
        scores, fit = served.model.split(rows)
        answers = [
            {"label": y, "score": float(s)} for y, s in zip(served.model.top_labels(rows), scores.max(1))
        ]
        if fit is not None:
            for a, f in zip(answers, fit.tolist()):
                a["fit"] = f
        return {"model": served.name, "predictions": answers}

    @app.post("/embed")
    async def embed(request: Request):
        """For curl: {"inputs": [...], "model": NAME (optional)} -> {"embeddings": [[...], ...]}, one per input."""
        served, rows = await plain_rows(request, embedding=True)
        return {"model": served.name, "embeddings": rows.tolist()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if repository is not None:
        _repository_routes(app, repository, cfg)

    async def read_json(request: Request) -> dict:
        return _json_object(await read_body(request.receive, request.headers, cfg.body_limit("text")))

    generation_routes(app, table, cfg, read_json)
    app.state.metrics, app.state.table = metrics, table
    return app


def _repository_routes(app, repository, cfg: ServeConfig) -> None:
    """The KServe/Triton model repository extension (who may call which: pmserve.serving.access)."""

    async def small_json(request: Request) -> dict:
        """The JSON object of a repository request; an empty body is {}."""
        return _json_object(await read_limited(request.receive, SMALL_BODY, cfg.body_timeout_s))

    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        params = await small_json(request)
        return repository.index(bool(params.get("ready", False)))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request):
        served = await repository.load(name, version_param(await small_json(request)))
        return {"name": name, "version": served.version, "state": READY}

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request):
        await small_json(request)
        await repository.unload(name)
        return {"name": name, "state": UNAVAILABLE, "reason": "unloaded"}


PARSE_ON_LOOP = 1 << 20  # bodies larger than this are parsed in a worker thread


async def read_limited(receive, max_body: int, timeout_s: float) -> bytes:
    """A request body from the ASGI `receive`: 413 past `max_body` bytes (as soon as they stream past it), 408
    when it has not arrived whole within `timeout_s` seconds (a slow or stalled client), 400 when the client
    went away."""

    async def chunks() -> list[bytes]:
        out, n = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away before its request body arrived")
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > max_body:
                raise RequestError(
                    413,
                    f"request body over {max_body} bytes (see --max-inputs, --max-text-chars, "
                    "--max-image-bytes)",
                )
            out.append(chunk)
            if not message.get("more_body", False):
                return out

    # asyncio.timeout's work, without its context object (every request pays this) and on Python 3.10 too
    task, expired = asyncio.current_task(), []
    timer = asyncio.get_running_loop().call_later(timeout_s, lambda: expired.append(task.cancel()))
    try:
        return b"".join(await chunks())
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):  # 3.11+: this cancellation is handled here, as asyncio.timeout does
            task.uncancel()
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    finally:
        timer.cancel()


def inflate(body: bytes, encoding: str, max_body: int) -> bytes:
    """A gzip or deflate body inflated, 413 as soon as it passes `max_body` bytes (a bomb stops there)."""
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, max_body)
    except zlib.error as e:
        raise RequestError(400, f"Content-Encoding {encoding}: corrupt ({e})") from None
    if d.unconsumed_tail:
        raise RequestError(413, f"request body over {max_body} bytes once decompressed")
    return out


def _json_object(body: bytes) -> dict:
    if not body.strip():
        return {}
    req = parse_json(body)
    if not isinstance(req, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return req
