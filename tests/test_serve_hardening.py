"""Issue 37, the server's half: one regression test per defect, each seen to fail on the code before its fix.

- 6: an image's size is read from its header and refused before it is decoded; text endpoints keep the text body
  limit while an image model serves;
- 7: bearer keys (--api-key, --admin-key), repository changes off beyond loopback without an admin key, a rollback
  that no longer freezes the poller, loading the version served is a no-op, reasons without server paths;
- 8: the body is read, within --body-timeout-s, before a version is held; lying binary length prefixes are refused
  before anything is unpacked;
- 9: a version number reused with other files is a new candidate, never READY for files not loaded;
- 10: a version that crashes ONNX Runtime kills a child process, not the server.

Servers run on 127.0.0.1 only; waits are on conditions.
"""

import base64
import io
import shutil
import socket
import struct
import time

import httpx
import numpy as np
import pytest

from tests.test_export import bundle, run  # noqa: F401 -- the tiny text run and its bundle
from tests.test_serve import infer_body, start, stderr
from tests.test_serve_repository import (  # noqa: F401 -- fixtures
    NAME,
    add_version,
    alter_byte,
    entry,
    exported,
    index,
    infer,
    load,
    metric,
    new_repo,
    servers,
    wait_for,
)

KEY, ADMIN = "k" * 24, "a" * 24


def png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with a few bytes of (truncated) data: what an image
    bomb looks like on the wire (the real thing compresses 500 MB of pixels into kilobytes)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def client(bundles, names, **opts):
    from fastapi.testclient import TestClient

    from pmserve.serving.app import create_app
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_models

    cfg = ServeConfig(provider="cpu", threads=1, **opts)
    return TestClient(create_app(load_models(bundles, names, cfg), cfg))


def image_body(images: list[bytes]) -> dict:
    data = [base64.b64encode(b).decode() for b in images]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


# ---------------------------------------------------------------- 6: image requests


def test_image_size_is_refused_from_its_header_before_decoding(digits, bundle):  # noqa: F811
    """Before: a 13000 x 13000 PNG (169 M pixels, under PIL's bomb limit) was decoded (half a GB) and then
    answered 400 'not a readable image'. Now 413 from the header, and a large real image is decoded reduced."""
    from PIL import Image

    with client([digits, bundle], ["digits", "text"]) as c:
        r = c.post("/v2/models/digits/infer", json=image_body([png(13000, 13000)]))
        assert r.status_code == 413 and "--max-image-pixels" in r.json()["error"], r.text
        r = c.post("/v2/models/digits/infer", json=image_body([png(20000, 20000)]))
        assert r.status_code == 413, r.text
        big = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 400, 3), dtype=np.uint8)).save(
            big, "PNG"
        )
        r = c.post("/v2/models/digits/infer", json=image_body([big.getvalue()]))
        assert r.status_code == 200 and len(r.json()["outputs"][1]["data"]) == 2, r.text


def test_text_endpoints_keep_the_text_body_limit_while_an_image_model_serves(digits, bundle):  # noqa: F811
    """Before: serving any image model raised every endpoint's body limit to --max-inputs x 16 MiB."""
    text_limit = 4 * (4 * 100 + 16) + (1 << 16)  # --max-inputs texts of --max-text-chars, 4 bytes a character
    junk = b"x" * (text_limit + 1)
    with client([digits, bundle], ["digits", "text"], max_inputs=4, max_text_chars=100) as c:
        r = c.post("/v2/models/text/infer", content=junk)
        assert r.status_code == 413, r.text
        r = c.post("/v2/models/digits/infer", content=junk)  # an image model's route takes images' sizes
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"], r.text


# ---------------------------------------------------------------- 7: access


def test_api_key_guards_everything_but_health(bundle):  # noqa: F811
    proc, url = start(bundle, "--name", NAME, "--api-key", KEY)
    try:
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        for method, path in [
            ("post", f"/v2/models/{NAME}/infer"),
            ("get", f"/v2/models/{NAME}"),
            ("get", "/v2"),
        ]:
            r = httpx.request(method, f"{url}{path}", json=infer_body(["dog"]))
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
            bad = httpx.request(method, f"{url}{path}", json=infer_body(["dog"]), headers=auth("x" * 24))
            assert bad.status_code == 401
        r = httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body(["dog"]), headers=auth(KEY))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"]
    finally:
        proc.kill()
        proc.wait()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_repository_changes_need_the_admin_key_or_loopback(exported, tmp_path):  # noqa: F811
    """Before: anyone who reached the port could unload or roll back a model. In process: the app told it
    listens beyond loopback."""
    from fastapi.testclient import TestClient

    from pmserve.serving.app import create_app
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.repository import Repository

    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1)
    for admin, status in [(None, 403), (ADMIN, 401)]:
        cfg = ServeConfig(provider="cpu", threads=1, poll_s=0, admin_key=admin)
        r = Repository(repo, cfg, log=lambda *_: None)
        with TestClient(create_app(r.load_all(), cfg, r, loopback=False)) as c:
            for op in ("load", "unload"):
                res = c.post(f"/v2/repository/models/{NAME}/{op}")
                assert res.status_code == status, res.text
            assert c.post(f"/v2/models/{NAME}/infer", json=infer_body(["dog"])).status_code == 200
            if admin:
                assert c.post(f"/v2/repository/models/{NAME}/unload", headers=auth(ADMIN)).status_code == 200
                assert c.post(f"/v2/models/{NAME}/infer", json=infer_body(["dog"])).status_code == 404


def test_is_loopback():
    from pmserve.serving.server import is_loopback

    for host, want in [("127.0.0.1", True), ("0.0.0.0", False)]:
        with socket.socket() as s:
            s.bind((host, 0))  # bound, never listening: no traffic
            assert is_loopback(s) is want


def test_rollback_does_not_freeze_the_poller(exported, servers, tmp_path):  # noqa: F811
    """Before: after a rollback to 1 with 2 present, the poller loaded only versions above 2; a version 2
    deleted and exported again (export takes the next number: 2 again) was never served."""
    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1, 2)
    proc, url = servers(repo, "--poll-s", 0.1)
    assert infer(url).json()["model_version"] == "2"
    assert load(url, 1).json()["version"] == "1"
    time.sleep(0.5)  # a few polls: the rollback holds while the versions present are those it saw
    assert infer(url).json()["model_version"] == "1"
    shutil.rmtree(repo / NAME / "2")
    add_version(repo, exported[0] / NAME / "2", 2)  # what `pmserve export --new-version` writes now
    wait_for("the new version 2 served", lambda: infer(url).json()["model_version"] == "2", timeout=20)


def test_loading_the_version_served_is_a_no_op_and_reasons_name_no_server_paths(exported, servers, tmp_path):  # noqa: F811
    """Before: loading the version served hashed and opened it again (a swap); the index's reasons held the
    server's absolute paths."""
    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0)
    swapped = metric(url, "pmserve_model_loads_total", model=NAME, result="swapped")
    r = load(url, 1)
    assert r.status_code == 200 and r.json() == {"name": NAME, "version": "1", "state": "READY"}
    assert metric(url, "pmserve_model_loads_total", model=NAME, result="swapped") == swapped
    add_version(repo, exported[0] / NAME / "1", 2, alter_byte("model.onnx"))
    r = load(url, 2)
    assert r.status_code == 400 and str(tmp_path) not in r.json()["error"], r.text
    e = entry(url, 2)
    assert e["state"] == "UNAVAILABLE" and "sha256" in e["reason"] and str(tmp_path) not in e["reason"], e
    assert not any(str(tmp_path) in str(x) for x in index(url))


# ---------------------------------------------------------------- 8: bodies before versions


def raw_request(url: str, path: str, body: bytes, send: int) -> socket.socket:
    """A request on a raw socket whose body stops after `send` bytes (a slow client)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=20)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    s.sendall(head.encode() + body[:send])
    return s


def read_response(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_stalled_body_is_answered_408(bundle):  # noqa: F811
    """Before: no body timeout; a client that stops sending held its connection (and a version) forever."""
    proc, url = start(bundle, "--name", NAME, "--body-timeout-s", 1)
    try:
        body = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["dog"]}]}'
        s = raw_request(url, f"/v2/models/{NAME}/infer", body, 10)
        s.settimeout(15)
        status, _ = read_response(s)
        s.close()
        assert status == 408
        assert httpx.post(f"{url}/v2/models/{NAME}/infer", json=infer_body(["dog"])).status_code == 200
    finally:
        proc.kill()
        proc.wait()


def test_the_version_is_chosen_after_the_body_arrived(exported, servers, tmp_path):  # noqa: F811
    """Before: a request held the version it looked up while its body trickled in (a swapped-out session kept in
    memory by a slow client). Now it takes the version serving once its body is complete."""
    import json

    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1)
    proc, url = servers(repo, "--poll-s", 0)
    body = json.dumps(infer_body(["dog and cat"])).encode()
    s = raw_request(url, f"/v2/models/{NAME}/infer", body, 10)
    add_version(repo, exported[0] / NAME / "1", 2)
    assert load(url, 2).json()["version"] == "2"
    s.sendall(body[10:])
    status, answer = read_response(s)
    s.close()
    assert status == 200 and json.loads(answer)["model_version"] == "2"


def test_lying_length_prefixes_are_refused_before_unpacking():
    """Before: every element of the binary data was unpacked (copied) before the count was compared with the
    shape: a shape [1] tensor of a million empty elements was a million copies."""
    from pmserve.serving.protocol import RequestError, infer_elements

    binary = struct.pack("<I", 0) * 1_000_000
    req = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(binary)},
            }
        ]
    }
    start_t = time.perf_counter()
    with pytest.raises(RequestError, match="more than 1 elements"):
        infer_elements(req, binary, "text", 8)
    assert time.perf_counter() - start_t < 0.05


# ---------------------------------------------------------------- 9: a version is its number and its files


def test_a_reused_version_number_is_a_new_candidate(exported, servers, tmp_path):  # noqa: F811
    """Before: version 2 deleted and written again was never loaded (2 was not above the version served), and
    the index said READY for files nobody had checked, even broken ones."""
    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1, 2)
    proc, url = servers(repo, "--poll-s", 0.1)
    assert infer(url).json()["model_version"] == "2"
    shutil.rmtree(repo / NAME / "2")
    add_version(repo, exported[0] / NAME / "1", 2, alter_byte("model.onnx"))
    wait_for("the broken version 2 refused", lambda: "sha256" in entry(url, 2).get("reason", ""), timeout=30)
    assert entry(url, 2)["state"] == "UNAVAILABLE"
    assert index(url, ready=True) == []
    assert infer(url).json()["model_version"] == "2"  # the version 2 loaded before still answers
    shutil.rmtree(repo / NAME / "2")
    add_version(repo, exported[0] / NAME / "2", 2)
    wait_for("the new version 2 READY", lambda: entry(url, 2)["state"] == "READY", timeout=30)
    assert metric(url, "pmserve_model_loads_total", model=NAME, result="swapped") == 1
    assert "version 2 serves (was version 2)" in stderr(proc)


# ---------------------------------------------------------------- 10: a crashing candidate


CRASH_ON_OPEN = """
import importlib.util, os, signal, sys

class _CrashingOrt:
    # onnxruntime, once imported, with an InferenceSession that dies (SIGSEGV) on a model.onnx with a CRASH file
    # beside it: what ONNX Runtime does on a crafted file, in whichever process opens it
    busy = False

    def find_spec(self, name, path=None, target=None):
        # every look-up, not only the first: transformers looks onnxruntime up without importing it
        if name != "onnxruntime" or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            init = module.InferenceSession.__init__

            def crashing(self, model, *args, **kwargs):
                if os.path.exists(os.path.join(os.path.dirname(str(model)), "CRASH")):
                    os.kill(os.getpid(), signal.SIGSEGV)
                init(self, model, *args, **kwargs)

            module.InferenceSession.__init__ = crashing

        spec.loader.exec_module = run
        return spec

sys.meta_path.insert(0, _CrashingOrt())
"""


def test_a_version_that_crashes_onnx_runtime_is_refused_and_the_server_lives(exported, tmp_path, monkeypatch):  # noqa: F811
    """Before: the version was opened in the server's process, and its crash was the server's."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_ON_OPEN)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    repo = new_repo(tmp_path, exported[0] / NAME / "1", 1)
    proc, url = start(None, "--repository", repo, "--poll-s", 0.1)
    try:
        add_version(repo, exported[0] / NAME / "2", 2, lambda f: (f / "CRASH").write_text(""))
        wait_for(
            "version 2 refused", lambda: proc.poll() is not None or "crash" in entry(url, 2).get("reason", "")
        )
        assert proc.poll() is None, stderr(proc)
        assert "SIGSEGV" in entry(url, 2)["reason"]
        assert infer(url).json()["model_version"] == "1"
        r = load(url, 2)
        assert r.status_code == 400 and "SIGSEGV" in r.json()["error"]
        assert proc.poll() is None and infer(url).json()["model_version"] == "1"
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- found by the fuzzer (tests/test_serve_fuzz.py)


def test_fuzz_findings_empty_tokens_outputs_and_tiny_images(bundle, digits):  # noqa: F811
    """Before: a text of no tokens (an empty text, with a tokenizer that adds no special tokens) failed its model
    call, 500; "outputs": [] answered no outputs (Triton answers all); a 1x1 image was read as channels first,
    500."""
    from PIL import Image

    with client([bundle, digits], ["text", "digits"]) as c:
        r = c.post("/v2/models/text/infer", json=infer_body([""]))
        assert r.status_code == 400 and "no tokens" in r.json()["error"], r.text
        r = c.post("/v2/models/text/infer", json=infer_body(["dog"]) | {"outputs": []})
        assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label", "scores"]
        tiny = io.BytesIO()
        Image.new("RGB", (1, 1)).save(tiny, "PNG")
        r = c.post("/v2/models/digits/infer", json=image_body([tiny.getvalue()]))
        assert r.status_code == 200, r.text


def test_fuzz_finding_non_json_constants_are_a_400(bundle):  # noqa: F811
    """Before: {"id": Infinity} was parsed (Python's JSON allows it), echoed, and failed the answer's encoding: 500."""
    with client([bundle], ["text"]) as c:
        body = b'{"id": Infinity, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["dog"]}]}'
        r = c.post("/v2/models/text/infer", content=body)
        assert r.status_code == 400 and "Infinity is not JSON" in r.json()["error"], r.text
