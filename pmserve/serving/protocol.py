"""The Open Inference Protocol v2 (KServe v2 / Triton REST) on the wire: parsing an infer request (JSON and the
binary tensor extension, which tritonclient uses by default), checking it against the model's one input and the
server's limits, and encoding the response; the repository extension's parameters; `RequestError`, the answer
to a request the server will not run. Pure functions over bytes and dicts: no HTTP framework, no model calls.

A classifier bundle answers with outputs `label` and `scores`; an embedding bundle with `embedding` FP32
[N, dim] (its metadata says which).
"""

from __future__ import annotations

import json
import struct

import numpy as np

from ..formats.repository import version_name
from .model import Served

HEADER_LENGTH = "inference-header-content-length"
READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # the repository extension's states of a version
SMALL_BODY = 1 << 16  # the repository endpoints take a few parameters, never data


class RequestError(Exception):
    """A request the server will not run: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def pack_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the binary tensor format: each as a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def count_bytes(raw: bytes, most: int) -> int:
    """How many BYTES elements `raw` holds, read from the length prefixes alone (nothing copied), counting at most
    `most` + 1: a body whose prefixes lie about its element count is refused before anything is unpacked."""
    count, k, view = 0, 0, memoryview(raw)
    while k < len(raw) and count <= most:
        if k + 4 > len(raw):
            raise RequestError(400, "binary BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", view, k)
        if k + 4 + n > len(raw):
            raise RequestError(400, "binary BYTES tensor: an element runs past the data")
        k += 4 + n
        count += 1
    return count


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


def _flatten(data, most: int) -> list:
    """v2 allows tensor data as a flat row-major list or nested lists of the tensor's shape; the elements in
    order, or 400 past `most` of them (a shape [N] tensor has no business nesting deep)."""
    out, stack = [], [iter([data])]
    while stack:
        x = next(stack[-1], _END)
        if x is _END:
            stack.pop()
        elif isinstance(x, list):
            if len(stack) > 32:
                raise RequestError(400, "tensor data: lists nested more than 32 deep")
            stack.append(iter(x))
        else:
            out.append(x)
            if len(out) > most:
                break
    return out


_END = object()


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
        return json.loads(body, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:  # "[[[[..." deeper than Python's recursion limit
        raise RequestError(400, "malformed JSON: nested too deep") from None


def _not_json(name: str):
    """NaN and Infinity are Python's JSON, not JSON: refused, as the answer could not carry them back."""
    raise ValueError(f"{name} is not JSON")


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
    if not (
        isinstance(shape, list)
        and len(shape) == 1
        and isinstance(shape[0], int)
        and not isinstance(shape[0], bool)
        and shape[0] >= 1
    ):
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
        count = count_bytes(binary, shape[0])  # from the length prefixes: nothing unpacked yet
        if count != shape[0]:
            raise RequestError(
                400, f"input {input_name!r}: shape {shape} but {_count(count, shape[0])} elements"
            )
        return unpack_bytes(binary)
    elif "data" in t:
        elements = _flatten(t["data"], shape[0])
    else:
        raise RequestError(400, f"input {input_name!r}: no 'data' and no binary_data_size")
    if len(elements) != shape[0]:
        raise RequestError(
            400, f"input {input_name!r}: shape {shape} but {_count(len(elements), shape[0])} elements"
        )
    return elements


def _count(n: int, want: int) -> str:
    return f"more than {want}" if n > want else str(n)


def requested_outputs(req: dict, names: tuple[str, ...] = ("label", "scores")) -> list[tuple[str, bool]]:
    """(name, as binary) of each output asked for; all of the model's `names` when the request names none."""
    params = req.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    outs = req.get("outputs")
    if outs is None or outs == []:  # as Triton: no outputs named, all of them
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


def infer_response(served: Served, req: dict, rows: np.ndarray) -> tuple[dict, bytes]:
    """The v2 response header and the binary data that follows it (empty when every output is JSON).
    `rows` are the model's (predict.Model): class scores (and the fit), or embeddings for an embedding model."""
    labels = [] if served.embedding else served.model.top_labels(rows)
    scores = rows if served.embedding else served.model.split(rows)[0]
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


def plain_inputs(req, max_inputs: int) -> list:
    """The inputs of a /predict or /embed body ({"inputs": [...]}), checked."""
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise RequestError(400, 'expected {"inputs": [text, ...]} with at least one input')
    if len(req["inputs"]) > max_inputs:
        raise RequestError(413, f"{len(req['inputs'])} inputs, more than --max-inputs {max_inputs}")
    return req["inputs"]


def version_param(req: dict) -> int | None:
    """The version asked for by {"parameters": {"version": "2"}} (a string or an integer), or None."""
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be an object")
    unknown = sorted(set(params) - {"version"})
    if unknown:
        raise RequestError(400, f"parameters {unknown}: not supported (this server takes 'version')")
    if "version" not in params:
        return None
    v = params["version"]
    n = version_name(str(v)) if isinstance(v, (str, int)) and not isinstance(v, bool) else None
    if n is None:
        raise RequestError(400, f'parameters.version: expected a version number such as "2", got {v!r}')
    return n


def internal_error(e: Exception) -> str:
    """What a 500 answer says."""
    return f"internal error: {type(e).__name__}: {e}"


def json_bytes(content) -> bytes:
    """JSON as Starlette's JSONResponse writes it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
