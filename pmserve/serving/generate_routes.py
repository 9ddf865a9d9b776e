"""The routes of a decoder (pmserve.serving.engine): the KServe v2 generate extension
(POST /v2/models/NAME/generate and /generate_stream) and the OpenAI-compatible /v1/completions,
/v1/chat/completions and /v1/models, streamed as server-sent events.

Each route only translates a request into (prompt ids, SamplingParams) and the engine's text deltas into the
protocol's JSON; the batching is the engine's. A client that goes away mid-stream cancels its sequence (the
streaming response is cancelled, and the generator's `finally` tells the engine).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from .. import defaults as D
from ..generation import SamplingParams
from .engine import Engine, Stream
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


def _streaming(events: AsyncIterator[bytes], stream: Stream):
    """A server-sent-events response; a client that disconnects cancels its sequence."""
    from starlette.responses import StreamingResponse

    async def body():
        try:
            async for chunk in events:
                yield chunk
        finally:
            stream.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _text(value, what: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise RequestError(400, f"{what}: must be a string")
    return value


def generation_routes(app, engine: Engine, read_json: Callable[[Request], Awaitable[dict]]) -> None:
    """Add a decoder's routes to APP. `read_json`: the request's JSON object, read within the body limits."""

    def model(name: str) -> None:
        if name != engine.name:
            raise RequestError(404, f"model {name!r} is not served (this server serves {engine.name!r})")

    def encode(text: str) -> list[int]:
        if len(text) > engine.cfg.max_text_chars:
            raise RequestError(
                413, f"the prompt has over {engine.cfg.max_text_chars} characters (--max-text-chars)"
            )
        return engine.gen.encode(text)

    async def v2_submit(name: str, request: Request) -> Stream:
        model(name)
        req = await read_json(request)
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, "parameters: must be a JSON object")
        p, ignore_eos = sampling(params)
        return engine.submit(encode(_text(req.get("text_input"), "text_input")), p, ignore_eos)

    @app.post("/v2/models/{name}/generate")
    async def v2_generate(name: str, request: Request):
        stream = await v2_submit(name, request)
        try:
            text = await stream.text()
        finally:
            stream.cancel()
        return {"model_name": name, "text_output": text, "finish_reason": stream.seq.finish_reason}

    @app.post("/v2/models/{name}/generate_stream")
    async def v2_generate_stream(name: str, request: Request):
        stream = await v2_submit(name, request)

        async def events():
            async for delta in stream:
                yield _sse({"model_name": name, "text_output": delta})
            yield _sse({"model_name": name, "text_output": "", "finish_reason": stream.seq.finish_reason})

        return _streaming(events(), stream)

    @app.get("/v1/models")
    async def v1_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "pmserve"}]}

    async def openai_request(request: Request, chat: bool):
        req = await read_json(request)
        model(str(req.get("model", engine.name)))
        if chat:
            messages = req.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            ):
                raise RequestError(
                    400, "messages: must be a non-empty list of {role, content} with text content"
                )
            if sum(len(m["content"]) for m in messages) > engine.cfg.max_text_chars:
                raise RequestError(413, f"the messages have over {engine.cfg.max_text_chars} characters")
            try:
                ids = engine.gen.encode_chat(
                    [{"role": m.get("role", "user"), "content": m["content"]} for m in messages]
                )
            except Exception as e:  # noqa: BLE001 -- a template that refuses these messages is the client's to fix
                raise RequestError(400, f"messages: the chat template refused them ({e})") from None
        else:
            ids = encode(_text(req.get("prompt"), "prompt"))
        p, ignore_eos = sampling(
            req, "max_completion_tokens" if chat and "max_completion_tokens" in req else "max_tokens"
        )
        stream = engine.submit(ids, p, ignore_eos)
        opts = req.get("stream_options") or {}
        return (
            stream,
            bool(req.get("stream")),
            bool(isinstance(opts, dict) and opts.get("include_usage")),
        )

    def openai_route(chat: bool):
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, final: bool, streaming: bool) -> dict:
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
            stream, streaming, include_usage = await openai_request(request, chat)
            head = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": engine.name,
                "system_fingerprint": None,
            }
            if not streaming:
                try:
                    text = await stream.text()
                finally:
                    stream.cancel()
                finish = FINISH.get(stream.seq.finish_reason, stream.seq.finish_reason)
                return {
                    **head,
                    "object": kind,
                    "choices": [choice(text, finish, True, False)],
                    "usage": _usage(stream),
                }
            chunk = {**head, "object": f"{kind}.chunk" if chat else kind}

            async def events():
                async for delta in stream:
                    yield _sse({**chunk, "choices": [choice(delta, None, False, True)]})
                finish = FINISH.get(stream.seq.finish_reason, stream.seq.finish_reason)
                yield _sse({**chunk, "choices": [choice("", finish, True, True)]})
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(stream)})
                yield _sse(b"[DONE]")

            return _streaming(events(), stream)

        return handler

    app.post("/v1/completions")(openai_route(chat=False))
    app.post("/v1/chat/completions")(openai_route(chat=True))
