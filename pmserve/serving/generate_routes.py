"""The routes of the decoders a server serves (pmserve.serving.engine): the KServe v2 generate extension
(POST /v2/models/NAME[/versions/V]/generate and /generate_stream) and the OpenAI-compatible /v1/completions,
/v1/chat/completions and /v1/models, streamed as server-sent events.

Each route only translates a request into (prompt ids, SamplingParams) and the engine's text deltas into the
protocol's JSON; the batching is the engine's. A request holds the version it looked up in the ModelTable until its
last token is sent (a version swap lets it finish on the old one). A client that goes away cancels its sequence:
mid-stream, the streaming response is cancelled and the generator's `finally` tells the engine; waiting for a whole
answer, a watcher on the connection sees the disconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from .. import defaults as D
from ..generation import SamplingParams
from .config import ServeConfig
from .engine import Engine, Stream
from .model_table import ModelTable, Slot
from .protocol import RequestError

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's finish_reason


def _number(params: dict, key: str, kind, default):
    value = params.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
    ):
        raise RequestError(
            400, f"{key}: must be a number{' (an integer)' if kind is int else ''}, got {value!r}"
        )
    return kind(value)


def sampling(params: dict, max_tokens_key: str = "max_tokens") -> tuple[SamplingParams, bool]:
    """(SamplingParams, ignore_eos) of a request's parameters (OpenAI's names; the v2 generate extension's
    `parameters` use the same). Absent ones take `pmserve generate`'s defaults (greedy, 128 tokens)."""
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop: must be a string or a list of strings")
    seed = params.get("seed")
    if seed is not None:
        seed = _number(params, "seed", int, None)
    p = SamplingParams(
        max_new_tokens=_number(params, max_tokens_key, int, D.GENERATE_MAX_NEW_TOKENS),
        temperature=_number(params, "temperature", float, D.GENERATE_TEMPERATURE),
        top_p=_number(params, "top_p", float, D.GENERATE_TOP_P),
        top_k=_number(params, "top_k", int, D.GENERATE_TOP_K),
        seed=seed,
        stop=tuple(stop),
    )
    if params.get("n", 1) != 1:
        raise RequestError(400, "n: only 1 is supported")
    return p, bool(params.get("ignore_eos", False))


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def _usage(stream: Stream) -> dict:
    p, c = len(stream.seq.prompt_ids), len(stream.seq.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text(value, what: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise RequestError(400, f"{what}: must be a string")
    return value


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (its body was read whole before: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Generation:
    """One request's sequence and the version it holds: answered whole (`text`) or streamed (`streaming`);
    either way the version is released and the sequence cancelled (a no-op once finished) at the end."""

    def __init__(self, table: ModelTable, slot: Slot, stream: Stream):
        self.table, self.slot, self.stream = table, slot, stream

    def end(self) -> None:
        self.stream.cancel()
        self.table.release(self.slot)

    async def text(self, request: Request) -> str:
        """The whole text; a client that goes away first cancels the sequence."""
        watch = asyncio.ensure_future(_disconnected(request))
        done = asyncio.ensure_future(self.stream.text())
        try:
            await asyncio.wait({done, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                self.stream.cancel()  # the engine ends it before its next step; the text so far comes back
            return await done
        finally:  # also when this request is cancelled itself (shutdown): no task outlives it
            watch.cancel()
            done.cancel()
            self.end()

    def streaming(self, events: AsyncIterator[bytes]):
        """A server-sent-events response; a client that disconnects cancels its sequence."""
        from starlette.responses import StreamingResponse

        async def body():
            try:
                async for chunk in events:
                    yield chunk
            finally:
                self.end()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )


def generation_routes(
    app, table: ModelTable, cfg: ServeConfig, read_json: Callable[[Request], Awaitable[dict]]
) -> None:
    """Add the decoders' routes to APP; they serve whatever decoders TABLE holds when a request arrives.
    `read_json`: the request's JSON object, read within the body limits."""

    def encode(engine: Engine, text: str) -> list[int]:
        if len(text) > cfg.max_text_chars:
            raise RequestError(413, f"the prompt has over {cfg.max_text_chars} characters (--max-text-chars)")
        return engine.gen.encode(text)

    def start(name: str, version: str | None, submit: Callable[[Engine], Stream]) -> _Generation:
        """Hold NAME's version, submit to its engine; released again if the submission is refused."""
        slot = table.hold(name, version)
        try:
            if not slot.served.causal:
                raise RequestError(
                    400,
                    f"model {name!r} is not a decoder: POST /v2/models/{name}/infer (or /predict, /embed)",
                )
            return _Generation(table, slot, submit(slot.runner))
        except BaseException:
            table.release(slot)
            raise

    async def v2_start(name: str, version: str | None, request: Request) -> _Generation:
        table.lookup(name, version)  # an unknown model is a 404 before its body is read
        req = await read_json(request)
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, "parameters: must be a JSON object")
        p, ignore_eos = sampling(params)
        text = _text(req.get("text_input"), "text_input")
        return start(name, version, lambda engine: engine.submit(encode(engine, text), p, ignore_eos))

    async def v2_generate(request: Request, name: str, version: str | None = None):
        g = await v2_start(name, version, request)
        text = await g.text(request)
        return {
            "model_name": name,
            "model_version": g.slot.served.version,
            "text_output": text,
            "finish_reason": g.stream.seq.finish_reason,
        }

    async def v2_generate_stream(request: Request, name: str, version: str | None = None):
        g = await v2_start(name, version, request)
        head = {"model_name": name, "model_version": g.slot.served.version}

        async def events():
            async for delta in g.stream:
                yield _sse({**head, "text_output": delta})
            yield _sse({**head, "text_output": "", "finish_reason": g.stream.seq.finish_reason})

        return g.streaming(events())

    for path in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.post(f"{path}/generate")(v2_generate)
        app.post(f"{path}/generate_stream")(v2_generate_stream)

    @app.get("/v1/models")
    async def v1_models():
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "pmserve"} for n in table.decoders()],
        }

    def default_model() -> str:
        first = table.decoders()
        if not first:
            raise RequestError(404, "this server serves no decoder (causal-lm) model")
        return first[0]

    def chat_ids(engine: Engine, messages) -> list[int]:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise RequestError(400, "messages: must be a non-empty list of {role, content} with text content")
        if sum(len(m["content"]) for m in messages) > cfg.max_text_chars:
            raise RequestError(413, f"the messages have over {cfg.max_text_chars} characters")
        try:
            return engine.gen.encode_chat(
                [{"role": m.get("role", "user"), "content": m["content"]} for m in messages]
            )
        except Exception as e:  # noqa: BLE001 -- a template that refuses these messages is the client's to fix
            raise RequestError(400, f"messages: the chat template refused them ({e})") from None

    async def openai_start(request: Request, chat: bool) -> tuple[_Generation, dict]:
        req = await read_json(request)
        name = str(req["model"]) if req.get("model") is not None else default_model()
        p, ignore_eos = sampling(
            req, "max_completion_tokens" if chat and "max_completion_tokens" in req else "max_tokens"
        )
        prompt = None if chat else _text(req.get("prompt"), "prompt")

        def submit(engine: Engine) -> Stream:
            ids = chat_ids(engine, req.get("messages")) if chat else encode(engine, prompt)
            return engine.submit(ids, p, ignore_eos)

        return start(name, None, submit), req

    def openai_route(chat: bool):
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, streaming: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if streaming else "message"
            return {
                "index": 0,
                key: {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }

        async def handler(request: Request):
            g, req = await openai_start(request, chat)
            stream = g.stream
            head = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": g.slot.served.name,
                "system_fingerprint": None,
            }
            if not req.get("stream"):
                text = await g.text(request)
                finish = FINISH.get(stream.seq.finish_reason, stream.seq.finish_reason)
                return {
                    **head,
                    "object": kind,
                    "choices": [choice(text, finish, False)],
                    "usage": _usage(stream),
                }
            opts = req.get("stream_options") or {}
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            chunk = {**head, "object": f"{kind}.chunk" if chat else kind}

            async def events():
                async for delta in stream:
                    yield _sse({**chunk, "choices": [choice(delta, None, True)]})
                finish = FINISH.get(stream.seq.finish_reason, stream.seq.finish_reason)
                yield _sse({**chunk, "choices": [choice("", finish, True)]})
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(stream)})
                yield _sse(b"[DONE]")

            return g.streaming(events())

        return handler

    app.post("/v1/completions")(openai_route(chat=False))
    app.post("/v1/chat/completions")(openai_route(chat=True))
