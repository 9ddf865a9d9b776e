"""`pmserve serve` as a real process on 127.0.0.1: tritonclient and plain HTTP, parity with `pmserve predict`,
dynamic batching seen in /metrics, bad requests answered 4xx while good ones go on, SIGTERM drains, and a
tampered bundle that never starts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from pmserve.predict import predict, score_all
from tests.test_export import bundle, run  # noqa: F401 -- the tiny trained run and its bundle

TEXTS = ["dog and cat", "a hammer", "the old city by the river", "joy", "bread with cheese and a pear"]
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle_dir, *opts):
    """A server process, once it answers ready; its stderr goes to a file (a pipe nobody reads could fill).
    `bundle_dir` None: no BUNDLE argument (opts give --repository)."""
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bundles = [] if bundle_dir is None else [str(bundle_dir)]
    cmd = [sys.executable, "-m", "pmserve", "serve", *bundles, "--port", str(port), "--threads", "1"]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [*cmd, *map(str, opts)], stdout=subprocess.DEVNULL, stderr=log, text=True, env=env
    )
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {stderr(proc)}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server not ready in 60 s")


def stderr(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


@pytest.fixture(scope="module")
def server(bundle):  # noqa: F811
    opts = "--max-batch 16 --max-wait-ms 50 --max-inputs 8 --max-text-chars 200".split()
    proc, url = start(bundle, "--name", NAME, *opts)
    yield url
    proc.kill()
    proc.wait()


def infer_body(texts, **tensor):
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts, **tensor}]}


def test_metadata_and_health_with_tritonclient(server, bundle):  # noqa: F811
    import tritonclient.http as tc

    c = tc.InferenceServerClient(server.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(NAME)
    assert c.get_server_metadata()["name"] == "pmserve"
    labels = json.loads((bundle / "labels.json").read_text())
    meta = c.get_model_metadata(NAME)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, len(labels)]},
    ]
    assert meta["parameters"]["labels"] == labels
    assert not c.is_model_ready("nope")


def test_results_equal_pmserve_predict(server, bundle):  # noqa: F811
    import tritonclient.http as tc

    rows, model = predict(bundle, TEXTS, provider="cpu")
    want_labels = [r["label"] for r in rows]
    want_scores = score_all(model, TEXTS)

    c = tc.InferenceServerClient(server.removeprefix("http://"))
    x = tc.InferInput("text", [len(TEXTS)], "BYTES")
    x.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))  # binary tensor extension
    res = c.infer(NAME, [x])
    assert [b.decode() for b in res.as_numpy("label")] == want_labels
    np.testing.assert_allclose(res.as_numpy("scores"), want_scores, rtol=1e-4, atol=1e-5)

    out = httpx.post(f"{server}/v2/models/{NAME}/infer", json={"id": "q1", **infer_body(TEXTS)}).json()
    assert out["id"] == "q1" and out["model_name"] == NAME
    by_name = {o["name"]: o for o in out["outputs"]}
    assert by_name["label"]["data"] == want_labels
    assert by_name["scores"]["shape"] == list(want_scores.shape)
    got = np.array(by_name["scores"]["data"], dtype=np.float32).reshape(want_scores.shape)
    np.testing.assert_allclose(got, want_scores, rtol=1e-4, atol=1e-5)

    plain = httpx.post(f"{server}/predict", json={"inputs": TEXTS}).json()
    assert [p["label"] for p in plain["predictions"]] == want_labels


def queued(url) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    fam = [f for f in text_string_to_metric_families(text) if f.name == "pmserve_queued_inputs"]
    return fam[0].samples[0].value if fam and fam[0].samples else 0.0


def batch_sizes(url) -> tuple[float, float]:
    """(batches, batches of one input) from the batch-size histogram; (0, 0) before the first batch (a
    labelled histogram has no samples until it is observed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "pmserve_batch_size")
    count = next((s.value for s in fam.samples if s.name.endswith("_count")), 0.0)
    ones = next((s.value for s in fam.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0"), 0.0)
    return count, ones


def test_concurrent_requests_each_get_their_own_rows(server, bundle):  # noqa: F811
    """Whether requests share a batch depends on timing; whatever the batches, each caller gets its own
    rows back (a row mix-up inside a batch would give a text another text's label)."""
    want = {t: r["label"] for t, r in zip(TEXTS, predict(bundle, TEXTS, provider="cpu")[0])}
    count0, _ = batch_sizes(server)
    texts = TEXTS * 4
    with ThreadPoolExecutor(12) as pool:
        res = list(pool.map(lambda t: httpx.post(f"{server}/predict", json={"inputs": [t]}), texts))
    assert all(r.status_code == 200 for r in res)
    assert [r.json()["predictions"][0]["label"] for r in res] == [want[t] for t in texts]
    count, _ = batch_sizes(server)
    assert count - count0 <= len(texts), "more model calls than requests"


BAD = {
    "malformed_json": (b'{"inputs": [', 400, "malformed JSON"),
    "wrong_datatype": (
        infer_body(["dog"]) | {"inputs": [{**infer_body(["dog"])["inputs"][0], "datatype": "FP32"}]},
        400,
        "BYTES",
    ),
    "wrong_shape": (infer_body(["dog", "cat"], shape=[1, 2]), 400, "shape"),
    "count_mismatch": (infer_body(["dog", "cat"], shape=[3]), 400, "but 2 elements"),
    "wrong_input_name": (
        infer_body(["dog"]) | {"inputs": [{**infer_body(["dog"])["inputs"][0], "name": "x"}]},
        400,
        "'text'",
    ),
    "not_text": (infer_body([1, 2]), 400, "expected a string"),
    "unknown_output": (infer_body(["dog"]) | {"outputs": [{"name": "logits"}]}, 400, "'logits'"),
    "too_many_inputs": (infer_body(["dog"] * 9), 413, "--max-inputs"),
    "too_long_text": (infer_body(["dog " * 60]), 413, "--max-text-chars"),
    "unknown_model": (infer_body(["dog"]), 404, "unknown model"),
    "predict_no_inputs": ({"texts": ["dog"]}, 400, "inputs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_4xx_while_good_ones_go_on(server, case):
    body, status, needle = BAD[case]
    path = (
        "/predict"
        if case.startswith("predict")
        else f"/v2/models/{'nope' if 'model' in case else NAME}/infer"
    )
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(httpx.post, f"{server}/predict", json={"inputs": ["dog and cat"]})
        bad = pool.submit(httpx.post, f"{server}{path}", content=content)
        bad, good = bad.result(), good.result()
    assert bad.status_code == status, bad.text
    assert needle in bad.json()["error"], bad.json()
    assert good.status_code == 200 and good.json()["predictions"][0]["label"]


def test_sigterm_answers_in_flight_requests_then_exits_0(bundle):  # noqa: F811
    # A long wait and a batch that 5 inputs cannot fill: the requests are still queued when SIGTERM lands.
    proc, url = start(bundle, "--max-batch", 64, "--max-wait-ms", 4000)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/predict", json={"inputs": [t]}, timeout=30) for t in TEXTS
            ]
            deadline = time.monotonic() + 20
            while queued(url) < len(TEXTS) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queued(url) == len(TEXTS)
            proc.send_signal(signal.SIGTERM)
            res = [f.result() for f in futures]
        assert [r.status_code for r in res] == [200] * len(TEXTS)
        assert proc.wait(timeout=30) == 0, stderr(proc)
        assert "stopped" in stderr(proc)
    finally:
        proc.kill()


def test_tampered_bundle_does_not_start(bundle, tmp_path):  # noqa: F811
    b = tmp_path / "tampered"
    shutil.copytree(bundle, b)
    raw = bytearray((b / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 1  # same size, one bit flipped
    (b / "model.onnx").write_bytes(bytes(raw))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-m", "pmserve", "serve", str(b), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode != 0
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "model.onnx" in lines[0] and "sha256" in lines[0], res.stderr


def test_image_bundle_takes_encoded_images_json_and_binary(digits, tmp_path):
    """In process (no socket): base64 PNGs in JSON and raw PNG bytes in tritonclient's binary format."""
    import base64

    import tritonclient.http as tc
    from fastapi.testclient import TestClient
    from PIL import Image

    from pmserve.serving.app import create_app
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_models

    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    rows, model = predict(digits, [str(p) for p in paths], provider="cpu")
    want = score_all(model, [str(p) for p in paths])
    pngs = [p.read_bytes() for p in paths]

    serve_cfg = ServeConfig(provider="cpu", threads=1)
    with TestClient(create_app(load_models([digits], [], serve_cfg), serve_cfg)) as c:
        meta = c.get("/v2/models/digits").json()
        assert meta["inputs"][0]["name"] == "image"
        b64 = [base64.b64encode(b).decode() for b in pngs]
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": b64}]}
        out = {o["name"]: o for o in c.post("/v2/models/digits/infer", json=body).json()["outputs"]}
        assert out["label"]["data"] == [r["label"] for r in rows]
        got = np.array(out["scores"]["data"], dtype=np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

        x = tc.InferInput("image", [3], "BYTES")
        x.set_data_from_numpy(np.array(pngs, dtype=object))
        raw, n = tc.InferenceServerClient.generate_request_body([x])
        r = c.post(
            "/v2/models/digits/infer", content=raw, headers={"Inference-Header-Content-Length": str(n)}
        )
        res = tc.InferenceServerClient.parse_response_body(
            r.content, header_length=int(r.headers["inference-header-content-length"])
        )
        np.testing.assert_allclose(res.as_numpy("scores"), want, rtol=1e-4, atol=1e-5)

        bad = c.post("/predict", json={"inputs": [base64.b64encode(b"not a png").decode()]})
        assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]


def _model_double(scores, lengths=None):
    """What the Batcher asks of a model (encode, lengths, score_rows) over a plain `scores(inputs)`: encoding is
    the identity, every input 1 long unless `lengths` says."""
    from types import SimpleNamespace

    return SimpleNamespace(
        encode=list,
        lengths=lengths or (lambda enc: [1] * len(enc)),
        score_rows=lambda enc, rows=None: scores(enc if rows is None else [enc[i] for i in rows]),
    )


def test_batcher_waits_only_under_concurrency():
    """A lone client's requests run at once (after the first, which waits for company that does not come);
    requests that queue up together turn the wait back on. An in-process Batcher over a recording model."""
    import asyncio
    from types import SimpleNamespace

    from pmserve.serving.batcher import Batcher
    from pmserve.serving.metrics import Metrics

    sizes = []

    def scores(inputs):
        sizes.append(len(inputs))
        return np.zeros((len(inputs), 2), np.float32)

    async def main():
        served = SimpleNamespace(name="m", model=_model_double(scores))
        b = Batcher(served, max_batch=8, max_wait_s=0.5, metrics=Metrics())
        b.start()

        async def timed(*batches):
            t = time.perf_counter()
            await asyncio.gather(*(b.infer(x) for x in batches))
            return time.perf_counter() - t

        first = await timed(["a"])
        lone = [await timed(["a"]) for _ in range(3)]
        together = await timed(["a"], ["b"], ["c"])  # queued before the batcher looks: one batch, no wait
        after = await timed(["a"])
        await b.close()
        return first, lone, together, after

    first, lone, together, after = asyncio.run(main())
    assert sizes == [1, 1, 1, 1, 3, 1]
    assert first >= 0.45 and after >= 0.45, "the wait for company was skipped"
    assert max(lone) < 0.25 and together < 0.25, "a lone request waited for company"


def test_requests_that_arrive_while_the_model_runs_share_one_batch():
    """Deterministic batching: the model is held busy on a first request while 11 more arrive; they run as
    one batch of 11 (not 11 calls), and each caller gets its own rows. The server-level test above cannot
    force the timing; this one holds the model on an event."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from pmserve.serving.batcher import Batcher
    from pmserve.serving.metrics import Metrics

    sizes, busy, release = [], threading.Event(), threading.Event()

    def scores(inputs):
        sizes.append(len(inputs))
        busy.set()
        assert release.wait(10)
        return np.array([[float(x), -float(x)] for x in inputs], np.float32)

    async def main():
        served = SimpleNamespace(name="m", model=_model_double(scores))
        b = Batcher(served, max_batch=16, max_wait_s=0.05, metrics=Metrics())
        b.start()
        first = asyncio.ensure_future(b.infer([0]))
        await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
        rest = [asyncio.ensure_future(b.infer([k])) for k in range(1, 12)]
        await asyncio.sleep(0.01)  # every request is queued behind the busy model
        release.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert sizes == [1, 11]
    assert [o.tolist() for o in out] == [[[float(k), -float(k)]] for k in range(12)]


def test_predict_defaults_to_the_first_bundle_given(bundle):  # noqa: F811
    """In process: with several bundles, /predict without "model" uses the first one on the command line."""
    from fastapi.testclient import TestClient

    from pmserve.serving.app import create_app
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_models

    cfg = ServeConfig(provider="cpu", threads=1)
    with TestClient(create_app(load_models([bundle, bundle], ["zeta", "alpha"], cfg), cfg)) as c:
        assert c.post("/predict", json={"inputs": ["dog"]}).json()["model"] == "zeta"
        assert c.get("/v2/models/alpha").json()["versions"] == ["1"]


def test_length_groups_minimise_padded_tokens_as_brute_force_does():
    """The grouping's cost (one call's overhead plus size x longest, per group) equals the best over every
    partition of the inputs (brute force over set partitions), and every input is in exactly one group."""
    import random

    from pmserve.serving.batcher import length_groups

    def cost(groups, lengths, call):
        return sum(call + len(g) * max(lengths[i] for i in g) for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        for p in partitions(items[1:]):
            for k in range(len(p)):
                yield p[:k] + [[items[0], *p[k]]] + p[k + 1 :]
            yield [[items[0]], *p]

    rng = random.Random(0)
    for _ in range(150):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 7))]
        call = rng.choice([0, 4, 16, 100])
        groups = length_groups(lengths, call)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        best = min(cost(p, lengths, call) for p in partitions(list(range(len(lengths)))))
        assert cost(groups, lengths, call) == best, (lengths, call, groups)
        assert [max(lengths[i] for i in g) for g in groups] == sorted(
            max(lengths[i] for i in g) for g in groups
        )
    assert length_groups([5, 5, 5]) == [[0, 1, 2]], "equal lengths are never split"
    assert length_groups([3, 40, 4, 41, 5, 60]) == [[0, 2, 4], [1, 3], [5]]


def test_a_queue_of_mixed_lengths_runs_as_calls_of_similar_length():
    """Deterministic: the model is held busy on a first request while 11 requests of short and long texts queue
    (one of them carries a short and a long text). With --by-length they run as calls grouped by length,
    shortest first, each caller gets its own rows, and the padded tokens (sum over calls of size x longest) are
    far fewer than the one mixed call of --no-by-length computes."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from pmserve.serving.batcher import Batcher
    from pmserve.serving.metrics import Metrics

    def text(k, words):
        return f"{k} " + "w " * (words - 1)

    short = [text(k, 2 + k % 3) for k in range(1, 7)]  # 2 to 4 words
    long = [text(k, 40 + k % 5) for k in range(7, 11)]  # 40 to 44 words
    requests = [[x] for x in short[:3] + long[:2] + short[3:] + long[2:]] + [[text(11, 3), text(12, 50)]]

    def serve_queue(by_length):
        calls, busy, release = [], threading.Event(), threading.Event()

        def scores(inputs):
            calls.append(list(inputs))
            busy.set()
            assert release.wait(10)
            return np.array([[float(x.split()[0]), len(x.split())] for x in inputs], np.float32)

        def lengths(inputs):
            return [len(x.split()) for x in inputs]

        async def main():
            served = SimpleNamespace(name="m", model=_model_double(scores, lengths))
            b = Batcher(served, max_batch=16, max_wait_s=0.05, metrics=Metrics(), by_length=by_length)
            b.start()
            first = asyncio.ensure_future(b.infer([text(0, 5)]))
            await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
            rest = [asyncio.ensure_future(b.infer(r)) for r in requests]
            await asyncio.sleep(0.01)  # every request is queued behind the busy model
            release.set()
            out = await asyncio.gather(first, *rest)
            await b.close()
            return out, b.metrics

        out, metrics = asyncio.run(main())
        for o, r in zip(out[1:], requests):  # each caller gets its own rows, in its own order
            assert o.tolist() == [[float(x.split()[0]), len(x.split())] for x in r]
        padded = sum(len(c) * max(lengths(c)) for c in calls[1:])
        counted = metrics.tokens.labels("m", "padded")._value.get()
        assert counted == padded + 5, "pmserve_batch_tokens{kind=padded} counts what the calls computed"
        return [lengths(c) for c in calls[1:]], padded

    grouped, padded = serve_queue(by_length=True)
    assert len(grouped) >= 2 and max(grouped[0]) <= 4, "the short texts run first, in one call"
    assert all(min(c) >= 40 for c in grouped[1:]), grouped
    assert [max(c) for c in grouped] == sorted(max(c) for c in grouped), "shortest call first"
    assert sorted(n for c in grouped for n in c) == sorted(
        n for r in requests for n in map(len, (x.split() for x in r))
    )
    mixed, padded_mixed = serve_queue(by_length=False)
    assert len(mixed) == 1 and len(mixed[0]) == 12, "--no-by-length: one call, as before"
    assert padded < 0.6 * padded_mixed, (padded, padded_mixed)


def test_served_sessions_do_not_spin(bundle):  # noqa: F811
    """ORT's intra-op threads spinning between runs would take the cores the event loop parses requests on:
    serve turns spinning off; predict and bench keep ORT's default."""
    from pmserve.predict import OrtModel
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle

    served = load_bundle(bundle, "m", ServeConfig(provider="cpu", threads=1))
    key = "session.intra_op.allow_spinning"
    assert served.model.session.get_session_options().get_session_config_entry(key) == "0"
    plain = OrtModel.from_bundle(bundle, "cpu", 1).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have"):  # unset: ORT's default, spinning
        plain.get_session_config_entry(key)


def test_infer_route_bodies_methods_and_metrics(server):
    """The v2 infer endpoint (a bare ASGI handler in front of FastAPI): a gzipped body gives the plain body's
    answer, an unknown encoding 415, a GET 405 with Allow, and /metrics counts all of them under the route
    template, as FastAPI's routes are counted."""
    import gzip

    from prometheus_client.parser import text_string_to_metric_families

    url = f"{server}/v2/models/{NAME}/infer"
    raw = json.dumps(infer_body(TEXTS)).encode()
    plain = httpx.post(url, content=raw)
    zipped = httpx.post(url, content=gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert plain.status_code == zipped.status_code == 200 and plain.json() == zipped.json()
    bad = httpx.post(url, content=raw, headers={"Content-Encoding": "br"})
    assert bad.status_code == 415 and "'br'" in bad.json()["error"]
    get = httpx.get(url)
    assert get.status_code == 405 and get.headers["allow"] == "POST" and get.json()["error"]

    def count(name, **labels):
        text = httpx.get(f"{server}/metrics").text
        fam = next(f for f in text_string_to_metric_families(text) if f.name == name)
        return sum(
            s.value for s in fam.samples if s.name.endswith("_total") and s.labels.items() >= labels.items()
        )

    endpoint = "/v2/models/{name}/infer"
    before = (
        count("pmserve_requests", endpoint=endpoint),
        count("pmserve_errors", endpoint=endpoint, code="405"),
    )
    httpx.get(url)
    httpx.post(url, content=raw)
    after = (
        count("pmserve_requests", endpoint=endpoint),
        count("pmserve_errors", endpoint=endpoint, code="405"),
    )
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1


@pytest.mark.parametrize("side, pad", [("right", None), ("left", None), ("right", "[MASK]")])
def test_batcher_encoding_pads_as_the_tokenizer_does(tiny_model, side, pad):
    """The batcher tokenizes a gathered batch once and pads each call from that (Preprocessor.encode / collate):
    for any subset of rows, in any order, the inputs equal the tokenizer's own `padding=True` call on those
    texts (MiniLM's WordPiece with [CLS]/[SEP] and truncation, and the test tokenizer), on either padding side
    and with a pad token whose id is not 0."""
    import torch

    from pmserve.backbone import Preprocessor, resolve_model

    texts = [
        "a",
        "",
        "the quick brown fox jumps over the lazy dog " * 3,
        "dog cat",
        "time flies like an arrow",
    ]
    for path, max_length in ((resolve_model("builtin:minilm"), 12), (tiny_model, 6)):
        prep = Preprocessor(path, "text", max_length)
        prep.tok.padding_side = side
        if pad:
            prep.tok.pad_token = pad
        enc = prep.encode(texts)
        assert prep.lengths(enc) == [
            len(x) for x in prep.tok(texts, truncation=True, max_length=max_length)["input_ids"]
        ]
        for rows in ([0, 1, 2, 3, 4], [3, 0], [2], [4, 1, 3]):
            subset = [texts[i] for i in rows]
            ref = prep.tok(subset, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            got = prep.collate(enc, rows)
            assert set(got) == {k for k in ref if k in ("input_ids", "attention_mask", "token_type_ids")}
            for k in got:
                assert torch.equal(got[k], ref[k]), (path, side, rows, k)


def test_batcher_encoding_without_a_pad_token_is_one_line(tiny_model):
    from pmserve.backbone import Preprocessor
    from pmserve.errors import PMError

    prep = Preprocessor(tiny_model, "text", 16)
    prep.tok.pad_token = None
    enc = prep.encode(["dog", "dog cat", "cat"])
    assert prep.collate(enc, [0, 2])["input_ids"].shape == (2, 1), "equal lengths need no padding"
    with pytest.raises(PMError, match="no padding token"):
        prep.collate(enc)


def test_a_fault_outside_the_model_call_fails_the_batch_instead_of_hanging_it():
    """A model that answers the wrong number of rows breaks the batcher's own bookkeeping, not the model call:
    every caller of that batch still gets an error (the server answers 500), none waits forever, and the next
    batch is served."""
    import asyncio
    from types import SimpleNamespace

    from pmserve.serving.batcher import Batcher
    from pmserve.serving.metrics import Metrics

    def scores(inputs):
        rows = len(inputs) + (inputs[0] == "bad")
        return np.zeros((rows, 2), np.float32)

    async def main():
        served = SimpleNamespace(name="m", model=_model_double(scores))
        b = Batcher(served, max_batch=8, max_wait_s=0.05, metrics=Metrics())
        b.start()
        bad = await asyncio.wait_for(
            asyncio.gather(b.infer(["bad", "x"]), b.infer(["y"]), return_exceptions=True), 5
        )
        good = await asyncio.wait_for(b.infer(["z"]), 5)
        await b.close()
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(x, Exception) for x in bad), bad
    assert good.shape == (1, 2)
