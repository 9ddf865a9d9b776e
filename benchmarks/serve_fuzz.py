"""Hostile requests against `pmserve serve` on 127.0.0.1 (issue 37): every answer must be a 4xx or a correct
result, the server must answer throughout, and its resident memory must stay bounded.

    python benchmarks/serve_fuzz.py [--bundle TEXT_BUNDLE --image-bundle IMAGE_BUNDLE] [--requests 5000]
                                    [--bombs 200] [--slow 40] [--max-seconds 900]
                                    [--out benchmarks/results/serve_fuzz.json]

Without bundles it builds two tiny ones first (a 2-layer BERT and a 2-layer ViT with random weights, one epoch of
`pmserve train`, `pmserve export`; the server's work per request does not depend on the model's size). One server
process serves both (`--body-timeout-s 2`, every other limit at its default). Requests come from one hypothesis
strategy (`hostile`, also run in CI by tests/test_serve_fuzz.py, fewer): valid requests, valid ones with one field
replaced by arbitrary JSON, arbitrary JSON and bytes, huge declared shapes, JSON nested thousands deep, binary
tensors whose length prefixes lie, lying Inference-Header-Content-Length, unknown encodings, gzip bombs (64 MiB of
zeros in 64 KiB), image bombs (PNG headers declaring up to 65535 x 65535 pixels, a real 6000 x 6000 PNG in 40 KiB),
large legal images (4000 x 4000), wrong methods and paths. Then --bombs heavy requests, 4 at a time (`bombs`:
real and declared image bombs, 16 large legal images in one request, gzip bombs), and --slow slow clients, 8 at
a time on raw sockets:
bodies that stall half-way, and bodies that trickle a byte every 0.2 s; each must be answered 408. Liveness
(GET /v2/health/live) is checked every 100 requests; the server's RSS is sampled every 20 ms (/proc), and its
peak is the kernel's high-water mark (VmHWM). Bounded: --requests + --bombs + --slow requests, the first
--max-seconds at most.
"""

from __future__ import annotations

import argparse
import base64
import functools
import gzip
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import free_port, wait_ready
from hypothesis import strategies as st

TEXT, IMAGE = "text", "image"  # the served model names
WORDS = "dog cat bread cheese hammer saw city river hour day joy anger".split()


@dataclass
class Req:
    """One request and what its answer may be: 'ok' (200 and a correct result), 'error' (a 4xx), 'any'."""

    method: str
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    expect: str = "any"
    kind: str = ""  # which generator made it, for the report


# ---------------------------------------------------------------- bodies


def png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few bytes of (truncated) pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@functools.cache
def real_png(side: int) -> bytes:
    """A real, complete black PNG of side x side pixels: kilobytes on the wire, side^2 x 3 bytes decoded."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (side, side)).save(out, "PNG", optimize=False)
    return out.getvalue()


@functools.cache
def small_png(w: int, h: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(b"0" * (64 << 20), compresslevel=9)


def tensor(name: str, data: list, **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data, **extra}]}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


@st.composite
def valid_text(draw) -> Req:
    data = draw(st.lists(texts, min_size=1, max_size=8))
    path = draw(st.sampled_from([f"/v2/models/{TEXT}/infer", f"/v2/models/{TEXT}/versions/1/infer"]))
    return Req("POST", path, json.dumps(tensor("text", data)).encode(), expect="ok", kind="valid text")


@st.composite
def valid_image(draw) -> Req:
    n = draw(st.integers(1, 4))
    imgs = [
        small_png(draw(st.integers(1, 64)), draw(st.integers(1, 64)), draw(st.integers(0, 3)))
        for _ in range(n)
    ]
    return Req(
        "POST", f"/v2/models/{IMAGE}/infer", json.dumps(tensor("image", [b64(x) for x in imgs])).encode(), expect="ok",
        kind="valid image",
    )  # fmt: skip


@st.composite
def mutated(draw) -> Req:
    """A valid request with one field replaced by arbitrary JSON."""
    req = tensor("text", ["dog and cat", "bread"])
    t = req["inputs"][0]
    where = draw(
        st.sampled_from(["name", "datatype", "shape", "data", "parameters", "inputs", "outputs", "id", "top"])
    )
    value = draw(json_values)
    if where == "inputs":
        req["inputs"] = value
    elif where in ("outputs", "id"):
        req[where] = value
    elif where == "top":
        req = value
    else:
        t[where] = value
    return Req("POST", f"/v2/models/{TEXT}/infer", json.dumps(req).encode(), kind="mutated field")


@st.composite
def shapes(draw) -> Req:
    n = draw(st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 257, 10**9, 2**63])))
    req = tensor("text", ["dog"] * draw(st.integers(0, 3)))
    req["inputs"][0]["shape"] = draw(st.sampled_from([[n], [n, n], [], [True]]))
    return Req("POST", f"/v2/models/{TEXT}/infer", json.dumps(req).encode(), kind="declared shape")


@st.composite
def binary(draw) -> Req:
    """The binary tensor extension with length prefixes that may lie."""
    model, name = draw(st.sampled_from([(TEXT, "text"), (IMAGE, "image")]))
    n = draw(st.integers(1, 300))
    prefixes = draw(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=20))
    tail = b"".join(struct.pack("<I", p) + b"x" * min(p, 8) for p in prefixes)
    if draw(st.booleans()):
        tail += struct.pack("<I", 0) * draw(st.integers(0, 200_000))  # many empty elements
    size = draw(st.one_of(st.just(len(tail)), st.integers(-5, 10**12)))
    head = {
        "inputs": [
            {"name": name, "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": size}}
        ]
    }
    raw = json.dumps(head).encode()
    hlen = draw(
        st.one_of(
            st.just(str(len(raw))), st.integers(-5, 10**9).map(str), st.text("0123456789-x.", max_size=5)
        )
    )
    headers = {"Inference-Header-Content-Length": hlen}
    return Req("POST", f"/v2/models/{model}/infer", raw + tail, headers, kind="binary prefixes")


@st.composite
def images(draw) -> Req:
    kind = draw(st.sampled_from(["header bomb", "real bomb", "large legal", "junk bytes", "not base64"]))
    if kind == "header bomb":
        data = [b64(png(draw(st.integers(5001, 65535)), draw(st.integers(5001, 65535))))]
        expect = "error"
    elif kind == "real bomb":
        data, expect = [b64(real_png(6000))], "error"
    elif kind == "large legal":
        data, expect = [b64(real_png(4000))], "ok"
    elif kind == "junk bytes":
        data, expect = [b64(draw(st.binary(max_size=200)))], "error"
    else:
        data, expect = [draw(st.text(max_size=50)) + "!"], "error"
    path = draw(st.sampled_from([f"/v2/models/{IMAGE}/infer", "/predict"]))
    body = tensor("image", data) if path.endswith("infer") else {"model": IMAGE, "inputs": data}
    return Req("POST", path, json.dumps(body).encode(), expect=expect, kind=f"image {kind}")


@st.composite
def raw_bodies(draw) -> Req:
    kind = draw(st.sampled_from(["bytes", "json", "deep", "gzip bomb", "bad gzip", "encoding", "predict"]))
    path = draw(
        st.sampled_from([f"/v2/models/{TEXT}/infer", f"/v2/models/{IMAGE}/infer", "/predict", "/embed"])
    )
    headers, expect = {}, "any"
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "deep":
        k = draw(st.integers(10, 200_000))
        body, expect = (
            (b"[" * k + b"]" * k if draw(st.booleans()) else b'{"a":' * k + b"1" + b"}" * k),
            "error",
        )
    elif kind == "gzip bomb":
        body, headers, expect = gzip_bomb(), {"Content-Encoding": "gzip"}, "error"
    elif kind == "bad gzip":
        body, headers, expect = draw(st.binary(max_size=100)), {"Content-Encoding": "gzip"}, "error"
    elif kind == "encoding":
        enc = draw(st.sampled_from(["br", "zstd", "compress", "x"]))
        body, headers, expect = b"{}", {"Content-Encoding": enc}, "error"
    else:
        body = json.dumps({"inputs": draw(st.lists(json_values, max_size=5)), "model": TEXT}).encode()
        path = "/predict"
    return Req("POST", path, body, headers, expect=expect, kind=f"raw {kind}")


@st.composite
def routes(draw) -> Req:
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]))
    name = draw(st.sampled_from([TEXT, IMAGE, "nope", "..", "%2e%2e", "a" * 300]))
    path = draw(
        st.sampled_from(
            [f"/v2/models/{name}", f"/v2/models/{name}/ready", f"/v2/models/{name}/infer", "/v2/repository/index",
             f"/v2/repository/models/{name}/load", f"/v2/models/{name}/versions/x/infer", "/nope", "/v2"]
        )
    )  # fmt: skip
    return Req(method, path, b"", kind="route")


def hostile():
    """One hostile (or valid) request."""
    return st.one_of(
        valid_text(), valid_image(), mutated(), shapes(), binary(), images(), raw_bodies(), routes()
    )


# ---------------------------------------------------------------- answers


def verdict(req: Req, status: int, headers, content: bytes) -> str | None:
    """None when the answer is a 4xx with an error body or a correct result; else what is wrong."""
    if 400 <= status < 500:
        if req.expect == "ok":
            return f"a valid request answered {status}: {content[:200]!r}"
        try:
            return None if "error" in json.loads(content) else "a 4xx without an error"
        except ValueError:
            return f"a 4xx whose body is not JSON: {content[:100]!r}"
    if status != 200:
        return f"status {status}: {content[:300]!r}"
    if req.expect == "error":
        return "a hostile request answered 200"
    if req.method != "POST" or not (req.path.endswith("/infer") or req.path in ("/predict", "/embed")):
        return None
    return _correct(req, headers, content)


def _correct(req: Req, headers, content: bytes) -> str | None:
    """A 200 answer to an inference request holds one result per input, of the model's shape."""
    try:
        n_header = headers.get("inference-header-content-length")
        answer = json.loads(content[: int(n_header)] if n_header else content)
        sent = _sent_inputs(req)
        if req.path in ("/predict", "/embed"):
            rows = answer.get("predictions", answer.get("embeddings"))
            return None if sent is None or len(rows) == sent else f"{len(rows)} results for {sent} inputs"
        outs = {o["name"]: o for o in answer["outputs"]}
        rows = {o["shape"][0] for o in outs.values()}
        if len(rows) != 1 or (sent is not None and rows != {sent}):
            return f"outputs of {rows} rows for {sent} inputs"
        if (
            "label" in outs
            and "data" in outs["label"]
            and len(outs["label"]["data"]) != outs["label"]["shape"][0]
        ):
            return "labels do not match their shape"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"a 200 that is not a v2 answer ({type(e).__name__}: {e})"
    return None


def _sent_inputs(req: Req) -> int | None:
    try:
        n = req.headers.get("Inference-Header-Content-Length")
        body = json.loads(req.body[: int(n)] if n else req.body)
        if req.path in ("/predict", "/embed"):
            return len(body["inputs"])
        return int(body["inputs"][0]["shape"][0])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


# ---------------------------------------------------------------- the run


def build_bundles(root: Path) -> tuple[Path, Path]:
    """Two tiny bundles, text and image (random weights, one epoch)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertModel,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from pmserve.export import export_bundle
    from pmserve.train import TrainConfig, train

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "a", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(root / "bert")  # fmt: skip
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(
        BertConfig(vocab_size=len(vocab), max_position_embeddings=64, **small), add_pooling_layer=False
    ).save_pretrained(root / "bert")
    ViTModel(ViTConfig(image_size=8, patch_size=4, **small), add_pooling_layer=False).save_pretrained(
        root / "vit"
    )
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(root / "vit")
    data = root / "data" / "t0"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        with (data / f"{split}.jsonl").open("w") as f:
            for k in range(16):
                label = ["animal", "food"][k % 2]
                f.write(
                    json.dumps({"text": " ".join(WORDS[(k % 2) * 2 : (k % 2) * 2 + 2]), "label": label})
                    + "\n"
                )
    out = []
    for name, data_spec, model in [
        ("text", str(root / "data"), root / "bert"),
        ("image", "builtin:digits:tasks=1,classes=2,train=8,test=4", root / "vit"),
    ]:
        cfg = TrainConfig(
            data=data_spec, model=str(model), epochs=1, batch_size=8, rank=2, fisher_samples=8, head="linear"
        )
        train(cfg, root / f"run-{name}", progress=False, log=lambda *_: None)
        export_bundle(root / f"run-{name}", root / name)
        out.append(root / name)
    return out[0], out[1]


class Rss:
    """The server's resident memory, sampled every 20 ms; its peak from the kernel's high-water mark."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def read(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self.stop.wait(0.02):
            try:
                self.samples.append(self.read("VmRSS"))
            except OSError:
                return


def start_server(text: Path, image: Path, body_timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pmserve", "serve", str(text), str(image), "--name", TEXT, "--name", IMAGE]
    cmd += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        "1",
        "--body-timeout-s",
        str(body_timeout_s),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}")


def fuzz(url: str, n: int, deadline: float, record) -> None:
    """`n` requests drawn from `hostile()` (hypothesis, generation only: a failure is recorded, not shrunk)."""
    import httpx
    from hypothesis import HealthCheck, Phase, given, settings

    client = httpx.Client(base_url=url, timeout=60)
    count = [0]

    @settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(hostile())
    def one(req: Req):
        if time.monotonic() > deadline:
            return
        count[0] += 1
        try:
            r = client.request(req.method, req.path, content=req.body, headers=req.headers)
            record(req, r.status_code, verdict(req, r.status_code, r.headers, r.content))
        except httpx.HTTPError as e:
            record(req, 0, f"no answer ({type(e).__name__}: {e})")
        if count[0] % 100 == 0:
            live = client.get("/v2/health/live", timeout=10).status_code
            record(Req("GET", "/v2/health/live", kind="liveness"), live, None if live == 200 else "not live")

    one()
    client.close()


def bombs(url: str, n: int, record) -> None:
    """`n` heavy requests, 4 at a time, in turn: a real 6000 x 6000 PNG (36 M pixels in 40 KiB), a PNG header
    declaring 13000 x 13000, 16 real 4000 x 4000 PNGs in one request (legal: decoded reduced, one at a time), and
    a gzip bomb (64 MiB of zeros in 64 KiB) to the image model's route, whose body limit is the largest."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    heavy = [
        Req("POST", f"/v2/models/{IMAGE}/infer", json.dumps(tensor("image", [b64(real_png(6000))])).encode(),
            expect="error", kind="bomb: real 6000x6000 PNG"),
        Req("POST", f"/v2/models/{IMAGE}/infer", json.dumps(tensor("image", [b64(png(13000, 13000))])).encode(),
            expect="error", kind="bomb: 13000x13000 PNG header"),
        Req("POST", f"/v2/models/{IMAGE}/infer", json.dumps(tensor("image", [b64(real_png(4000))] * 16)).encode(),
            expect="ok", kind="heavy: 16 real 4000x4000 PNGs"),
        Req("POST", f"/v2/models/{IMAGE}/infer", gzip_bomb(), {"Content-Encoding": "gzip"}, expect="error",
            kind="bomb: gzip 64 MiB"),
    ]  # fmt: skip

    def one(k: int) -> None:
        req = heavy[k % len(heavy)]
        try:
            r = httpx.request(req.method, url + req.path, content=req.body, headers=req.headers, timeout=120)
            record(req, r.status_code, verdict(req, r.status_code, r.headers, r.content))
        except httpx.HTTPError as e:
            record(req, 0, f"no answer ({type(e).__name__}: {e})")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))


def slow_clients(url: str, n: int, body_timeout_s: float, record) -> None:
    """`n` slow bodies, 8 at a time: half stall after half their body, half trickle a byte every 0.2 s."""
    from concurrent.futures import ThreadPoolExecutor

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(tensor("text", ["dog and cat"] * 4)).encode()

    def one(k: int) -> None:
        req = Req(
            "POST",
            f"/v2/models/{TEXT}/infer",
            body,
            expect="error",
            kind="slow " + ("stall", "trickle")[k % 2],
        )
        s = socket.create_connection((host, int(port)), timeout=body_timeout_s + 20)
        try:
            head = f"POST {req.path} HTTP/1.1\r\nHost: f\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            s.sendall(head + body[: len(body) // 2])
            if k % 2:
                s.settimeout(0.2)
                for b in body[len(body) // 2 :]:
                    try:
                        s.sendall(bytes([b]))
                        if s.recv(1, socket.MSG_PEEK):
                            break
                    except (TimeoutError, BlockingIOError):
                        continue
                    except OSError:
                        break
                s.settimeout(body_timeout_s + 20)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            status = int(data.split(b" ", 2)[1]) if data else 0
            record(req, status, None if status == 408 else f"a slow body answered {status or 'nothing'}")
        except OSError as e:
            record(req, 0, f"slow client: {type(e).__name__}: {e}")
        finally:
            s.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a text bundle (default: build a tiny one)")
    ap.add_argument("--image-bundle", type=Path, help="an image bundle (default: build a tiny one)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--slow", type=int, default=40)
    ap.add_argument("--bombs", type=int, default=200)
    ap.add_argument("--body-timeout-s", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_fuzz.json")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None or args.image_bundle is None:
            text, image = build_bundles(Path(tmp))
        else:
            text, image = args.bundle, args.image_bundle
        for side in (4000, 6000):
            real_png(side)  # built before the clock starts
        gzip_bomb()
        proc, url = start_server(text, image, args.body_timeout_s)
        rss = Rss(proc.pid)
        at_start = rss.read("VmRSS")
        statuses, kinds, failures = Counter(), Counter(), []
        lock = threading.Lock()

        def record(req: Req, status: int, problem: str | None) -> None:
            with lock:
                statuses[status] += 1
                kinds[req.kind] += 1
                if problem is not None:
                    failures.append(
                        {"kind": req.kind, "path": req.path, "status": status, "problem": problem}
                    )

        started = time.monotonic()
        try:
            fuzz(url, args.requests, started + args.max_seconds, record)
            bombs(url, args.bombs, record)
            slow_clients(url, args.slow, args.body_timeout_s, record)
            alive = proc.poll() is None
            peak = rss.read("VmHWM")
        finally:
            rss.stop.set()
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        seconds = time.monotonic() - started
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        "command": " ".join(sys.argv),
        "requests": sum(statuses.values()),
        "seconds": round(seconds, 1),
        "answers_by_status": {str(k): v for k, v in sorted(statuses.items())},
        "requests_by_kind": dict(sorted(kinds.items())),
        "failures": len(failures),
        "failure_examples": failures[:20],
        "server_alive_at_end": alive,
        "rss_mib": {
            "at_start": round(at_start / 2**20, 1),
            "peak_sampled": round(max(rss.samples, default=0) / 2**20, 1),
            "peak_high_water_mark": round(peak / 2**20, 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failure_examples"}, indent=2))
    if failures or not alive:
        print(json.dumps(failures[:20], indent=2), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
