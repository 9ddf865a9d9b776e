"""`pmserve serve` of a decoder bundle as a real process: the v2 generate extension and the OpenAI-compatible
routes give what pmserve.generation gives for the same prompt alone (greedy and seeded), streams arrive as deltas
that add up to the same text, concurrent requests do not change each other's output, a client that goes away frees
its slot, and the limits answer 4xx. Decoders are served beside encoders and each other, from a repository too,
where a new version swaps in while a stream on the old one goes on to its end."""

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_export import bundle, run  # noqa: F401 -- a tiny classifier bundle to serve beside decoders
from tests.test_serve import start, stderr

NAME = "llama"
PROMPTS = ["the cat sat on", "a dog ran fast", "red house and blue sky", "big tree"]


@pytest.fixture(scope="module")
def server(llama_bundle):
    opts = "--max-sequences 6 --max-prompt-tokens 12 --max-new-tokens 5000".split()
    proc, url = start(llama_bundle, "--name", NAME, *opts)
    yield url
    proc.kill()
    proc.wait()
    assert "Traceback" not in stderr(proc)


@pytest.fixture(scope="module")
def gen(llama_bundle):
    from pmserve.generation import Generator

    return Generator.from_bundle(llama_bundle)


@pytest.fixture(scope="module")
def other_llama(tiny_llama, tmp_path_factory):
    """A second decoder bundle: the tiny Llama with other weights (a new version of a model, or another model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pmserve.export import export_bundle

    root = tmp_path_factory.mktemp("other-llama")
    shutil.copytree(tiny_llama, root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    torch.manual_seed(1)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.5 * w.std() * torch.randn_like(w))
    model.save_pretrained(root / "model")
    export_bundle(root / "model", root / "bundle")
    return root / "bundle"


def alone(gen, prompt: str, chat: bool = False, ignore_eos: bool = False, **params):
    """The reference: pmserve.generation on this one prompt, alone, in this process."""
    from pmserve.generation import SamplingParams, Sequence

    seq = Sequence(
        gen.encode(prompt, chat), SamplingParams(**params), gen.tokenizer, [] if ignore_eos else gen.eos_ids
    )
    for _ in gen.stream([seq]):
        pass
    return seq


def sse(lines) -> list:
    """The JSON events of a server-sent-events body (`data: [DONE]` kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_v2_generate_equals_generation_greedy(server, gen):
    want = alone(gen, PROMPTS[0], max_new_tokens=20)
    r = httpx.post(
        f"{server}/v2/models/{NAME}/generate",
        json={"text_input": PROMPTS[0], "parameters": {"max_tokens": 20, "temperature": 0}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == want.text
    assert r.json()["finish_reason"] == want.finish_reason
    meta = httpx.get(f"{server}/v2/models/{NAME}").json()
    assert meta["parameters"]["kind"] == "causal-lm" and meta["inputs"][0]["name"] == "text_input"
    assert httpx.get(f"{server}/v2/models/{NAME}/ready").json()["ready"] is True
    assert "generate" in httpx.get(f"{server}/v2").json()["extensions"]


def test_stream_deltas_add_up_to_the_text(server, gen):
    params = {"max_tokens": 30, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    want = alone(gen, PROMPTS[1], ignore_eos=True, max_new_tokens=30, temperature=1.0, seed=7)
    with httpx.stream(
        "POST",
        f"{server}/v2/models/{NAME}/generate_stream",
        json={"text_input": PROMPTS[1], "parameters": params},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    deltas = [e["text_output"] for e in events[:-1]]
    assert len(deltas) > 1 and all(deltas)  # delivered as it came, not as one piece
    assert events[-1]["finish_reason"] == "length"
    full = httpx.post(
        f"{server}/v2/models/{NAME}/generate", json={"text_input": PROMPTS[1], "parameters": params}
    ).json()
    assert "".join(deltas) == full["text_output"] == want.text


def test_openai_routes_with_httpx(server, gen):
    want = alone(gen, PROMPTS[2], max_new_tokens=12)
    out = httpx.post(
        f"{server}/v1/completions",
        json={"model": NAME, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0},
    ).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == want.text
    assert out["usage"]["prompt_tokens"] == len(want.prompt_ids)
    assert out["usage"]["completion_tokens"] == len(want.tokens)
    assert out["choices"][0]["finish_reason"] == {"eos": "stop"}.get(want.finish_reason, want.finish_reason)

    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want.text
    assert events[-2]["choices"][0]["finish_reason"] is not None

    chat = alone(gen, PROMPTS[3], chat=True, max_new_tokens=10)
    msg = [{"role": "user", "content": PROMPTS[3]}]
    out = httpx.post(f"{server}/v1/chat/completions", json={"messages": msg, "max_tokens": 10}).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": chat.text}
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["id"] == NAME


def test_concurrent_requests_get_what_they_get_alone(server, gen):
    cases = [(p, 100 + i) for i, p in enumerate(PROMPTS)] * 2  # 8 requests: more than fit (6) are refused
    cases = cases[:6]
    want = [alone(gen, p, max_new_tokens=25, temperature=0.9, top_k=8, seed=s).text for p, s in cases]

    def ask(case):
        p, s = case
        body = {"prompt": p, "max_tokens": 25, "temperature": 0.9, "top_k": 8, "seed": s}
        return httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    assert got == want


def test_genai_graph_served_concurrently(genai_llama):
    """A bundle of the builder's GroupQueryAttention graph serves as a traced one does: it passes the load checks
    (probe, greedy tokens, the candidate child's run) and concurrent requests, batched with their caches
    right-padded in one shared buffer, each get what they get alone."""
    from pmserve.generation import Generator

    folder = genai_llama[1]
    gen = Generator.from_bundle(folder)
    cases = [(p, 100 + i) for i, p in enumerate(PROMPTS)]
    want = [alone(gen, p, max_new_tokens=40, temperature=0.9, top_k=8, seed=s).text for p, s in cases]
    want.append(alone(gen, PROMPTS[0], max_new_tokens=80, ignore_eos=True).text)  # past the first capacity
    proc, url = start(folder, "--name", "g")
    try:

        def ask(i):
            if i == len(cases):
                body = {"prompt": PROMPTS[0], "max_tokens": 80, "ignore_eos": True}
            else:
                p, s = cases[i]
                body = {"prompt": p, "max_tokens": 40, "temperature": 0.9, "top_k": 8, "seed": s}
            r = httpx.post(f"{url}/v1/completions", json={"model": "g", **body}, timeout=60)
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(want)) as pool:
            got = list(pool.map(ask, range(len(want))))
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in stderr(proc)
    assert got == want


def test_disconnect_frees_its_slot(server):
    before = metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled")
    body = {"prompt": PROMPTS[0], "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert sse([next(lines) for _ in range(3)])  # a few deltas, then the client goes away
    deadline = time.monotonic() + 30
    while metric(server, "pmserve_active_sequences", model=NAME) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "pmserve_active_sequences", model=NAME) == 0
    assert metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled") == before + 1


def test_limits_answer_4xx(server):
    def err(path, body, status):
        r = httpx.post(f"{server}{path}", json=body)
        assert r.status_code == status, r.text
        assert "\n" not in r.json()["error"] and r.json()["error"]

    err("/v1/completions", {"prompt": " ".join(["cat"] * 20)}, 400)  # over --max-prompt-tokens 12
    err("/v1/completions", {"prompt": "cat", "max_tokens": 5001}, 400)  # over --max-new-tokens
    err("/v1/completions", {"prompt": "cat", "temperature": -1}, 400)
    err("/v1/completions", {"prompt": "cat", "n": 2}, 400)
    err("/v1/completions", {"prompt": 3}, 400)
    err("/v1/completions", {"prompt": "cat", "model": "nope"}, 404)
    err(f"/v2/models/{NAME}/generate", {"parameters": {}}, 400)

    # --max-sequences 6: six long streams held open, the seventh is refused, then all are let go
    body = {"prompt": "cat", "max_tokens": 5000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        held = [c.stream("POST", f"{server}/v1/completions", json=body) for _ in range(6)]
        for h in held:
            h.__enter__()
        try:
            err("/v1/completions", {"prompt": "cat", "max_tokens": 1}, 429)
        finally:
            for h in held:
                h.__exit__(None, None, None)


def test_the_openai_client(server, gen):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    want = alone(gen, PROMPTS[0], max_new_tokens=15)
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=15, temperature=0)
    assert out.choices[0].text == want.text and out.usage.completion_tokens == len(want.tokens)

    chat = alone(gen, PROMPTS[1], chat=True, ignore_eos=True, max_new_tokens=15, temperature=0.7, seed=3)
    msg = [{"role": "user", "content": PROMPTS[1]}]
    kw = {"model": NAME, "messages": msg, "max_tokens": 15, "temperature": 0.7, "seed": 3}
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.text and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=6000)


def test_engine_failure_and_shutdown_end_every_stream(gen):
    """In process: a model call that fails answers 500 to the requests running and the engine goes on; close()
    ends what still runs as cancelled, with its slot freed."""
    import asyncio

    from pmserve.generation import Generator, PaddedCache, SamplingParams
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.engine import Engine
    from pmserve.serving.model import Served
    from pmserve.serving.protocol import RequestError

    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return gen.decoder(*args)

    flaky.empty_past = gen.decoder.empty_past
    flaky.prefill = lambda rows, pad_id: PaddedCache.prefill(flaky, rows, pad_id)
    flaky_gen = Generator(flaky, gen.tokenizer, gen.eos_ids, gen.pad_id)
    engine = Engine(Served(NAME, Path("."), flaky_gen), ServeConfig())
    ids = gen.encode(PROMPTS[0])

    async def scenario():
        engine.start()
        failed = engine.submit(ids, SamplingParams(max_new_tokens=50), ignore_eos=True)
        with pytest.raises(RequestError, match="boom") as e:
            await failed.text()
        assert e.value.status == 500
        ok = await engine.submit(ids, SamplingParams(max_new_tokens=8)).text()
        assert ok == alone(gen, PROMPTS[0], max_new_tokens=8).text
        held = engine.submit(ids, SamplingParams(max_new_tokens=1000), ignore_eos=True)
        await anext(aiter(held))  # running
        await engine.close()
        await held.text()
        return held

    held = asyncio.run(scenario())
    assert held.seq.finish_reason == "cancelled" and engine.active == 0


def test_api_key_and_metrics(llama_bundle):
    key = "k" * 16
    proc, url = start(llama_bundle, "--name", NAME, "--api-key", key)
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 3, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        auth = {"authorization": f"Bearer {key}"}
        out = httpx.post(f"{url}/v1/completions", json=body, headers=auth).json()
        assert out["usage"]["completion_tokens"] == 3
        from prometheus_client.parser import text_string_to_metric_families

        samples = {
            (s.name, s.labels.get("reason")): s.value
            for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=auth).text)
            for s in f.samples
        }
        assert samples[("pmserve_generated_tokens_total", None)] == 3
        assert samples[("pmserve_prompt_tokens_total", None)] == out["usage"]["prompt_tokens"]
        assert samples[("pmserve_time_to_first_token_seconds_count", None)] == 1
        assert samples[("pmserve_sequences_finished_total", "length")] == 1
    finally:
        proc.kill()
        proc.wait()


def test_many_streams_with_random_disconnects_leave_no_slot(server):
    import random

    before = metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled")
    before += metric(server, "pmserve_sequences_finished_total", model=NAME, reason="length")
    rng = random.Random(0)
    plans = [(rng.choice(PROMPTS), rng.randint(5, 400), rng.random() < 0.5) for _ in range(30)]

    def one(plan):
        prompt, n, leave = plan
        body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "stream": True}
        while True:  # a slot freed by a disconnect is freed between steps: a client retries a 429
            with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
                if r.status_code == 429:
                    time.sleep(0.05)
                    continue
                lines = r.iter_lines()
                if leave:
                    next(lines)
                    return
                assert sse(lines)[-1] == "[DONE]"
                return

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, plans))
    deadline = time.monotonic() + 30
    while metric(server, "pmserve_active_sequences", model=NAME) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "pmserve_active_sequences", model=NAME) == 0
    after = metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled")
    after += metric(server, "pmserve_sequences_finished_total", model=NAME, reason="length")
    assert after - before == len(plans)


def test_curl(server, gen):
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("no curl")
    want = alone(gen, PROMPTS[2], max_new_tokens=10)
    body = json.dumps({"text_input": PROMPTS[2], "parameters": {"max_tokens": 10}})
    out = subprocess.run(
        ["curl", "-sN", f"{server}/v2/models/{NAME}/generate_stream", "-d", body],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    events = sse(out.splitlines())
    assert "".join(e["text_output"] for e in events) == want.text


def test_a_whole_answer_whose_client_goes_away_frees_its_slot(server):
    before = metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled")
    body = {"prompt": PROMPTS[0], "max_tokens": 5000, "ignore_eos": True}  # not streamed
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 30
    while metric(server, "pmserve_active_sequences", model=NAME) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "pmserve_active_sequences", model=NAME) == 0
    assert metric(server, "pmserve_sequences_finished_total", model=NAME, reason="cancelled") == before + 1


def test_decoders_beside_each_other_and_an_encoder(llama_bundle, other_llama, bundle, gen):  # noqa: F811
    from pmserve.generation import Generator

    other = Generator.from_bundle(other_llama)
    want_a, want_b = (alone(g, PROMPTS[0], max_new_tokens=12).text for g in (gen, other))
    assert want_a != want_b  # the two decoders are told apart by their answers
    proc, url = start(llama_bundle, other_llama, bundle, *"--name a --name b --name cls".split())
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["a", "b"]
        for name, want in (("a", want_a), ("b", want_b), (None, want_a)):  # no model: the first decoder
            body = {"prompt": PROMPTS[0], "max_tokens": 12} | ({"model": name} if name else {})
            out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            assert out["choices"][0]["text"] == want and out["model"] == (name or "a")
        r = httpx.post(
            f"{url}/v2/models/b/generate", json={"text_input": PROMPTS[0], "parameters": {"max_tokens": 12}}
        )
        assert r.json()["text_output"] == want_b and r.json()["model_version"] == "1"
        meta = httpx.get(f"{url}/v2/models/b").json()
        assert meta["parameters"]["kind"] == "causal-lm" and meta["parameters"]["max_sequences"] > 0
        assert httpx.get(f"{url}/v2/models/cls").json()["parameters"]["kind"] == "classifier"
        assert httpx.post(f"{url}/predict", json={"inputs": ["dog"]}).json()["model"] == "cls"
        for path, body, needle in (
            (
                "/v2/models/a/infer",
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
                "decoder",
            ),
            ("/predict", {"inputs": ["dog"], "model": "b"}, "decoder"),
            ("/v2/models/cls/generate", {"text_input": "x"}, "not a decoder"),
            ("/v1/completions", {"model": "cls", "prompt": "x"}, "not a decoder"),
            ("/v1/completions", {"model": "nope", "prompt": "x"}, "unknown model"),
        ):
            r = httpx.post(f"{url}{path}", json=body)
            assert r.status_code in (400, 404) and needle in r.json()["error"], (path, r.text)
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in stderr(proc)


def test_a_new_decoder_version_swaps_in_while_a_stream_on_the_old_one_goes_on(
    llama_bundle, other_llama, gen, tmp_path
):
    from pmserve.generation import Generator

    repo = tmp_path / "repo"
    shutil.copytree(llama_bundle, repo / NAME / "1")
    old = alone(gen, PROMPTS[0], ignore_eos=True, max_new_tokens=300).text
    new = alone(Generator.from_bundle(other_llama), PROMPTS[1], max_new_tokens=12).text
    proc, url = start(None, "--repository", repo, "--poll-s", "0.2", "--max-new-tokens", "20000")
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 20000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            events = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {"))
            got = next(events)["choices"][0]["text"]
            tmp = (
                repo / NAME / ".2.tmp"
            )  # written whole, then renamed, as `pmserve export --new-version` does
            shutil.copytree(other_llama, tmp)
            os.rename(tmp, repo / NAME / "2")
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/v2/models/{NAME}").json()["versions"] != ["2"]:
                assert time.monotonic() < deadline, "version 2 never served"
                time.sleep(0.1)
            assert metric(url, "pmserve_active_sequences", model=NAME) == 1  # the old stream still runs
            out = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 12}).json()
            assert out["choices"][0]["text"] == new  # a request after the swap: version 2
            for _ in range(50):  # the old stream goes on, on version 1, then its client leaves
                got += next(events)["choices"][0]["text"]
        assert old.startswith(got) if len(got) <= len(old) else got.startswith(old)
        deadline = time.monotonic() + 30
        while metric(url, "pmserve_active_sequences", model=NAME) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "pmserve_active_sequences", model=NAME) == 0
        assert metric(url, "pmserve_sequences_finished_total", model=NAME, reason="cancelled") == 1
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in stderr(proc)


def test_a_decoder_that_fails_its_probe_does_not_serve(llama_bundle, tmp_path):
    from pmserve.errors import PMError
    from pmserve.formats.bundle import MANIFEST, PROBE, read_manifest, write_manifest
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle

    for case in ("logits", "tokens"):
        b = tmp_path / case
        shutil.copytree(llama_bundle, b)
        m = read_manifest(b)
        if case == "logits":
            probe = json.loads((b / PROBE).read_text())
            probe["scores"][0][5] += 0.1
            (b / PROBE).write_text(json.dumps(probe))
        else:
            m["probe"]["greedy_tokens"][1][0] += 1
        (b / MANIFEST).unlink()
        write_manifest(b, {k: v for k, v in m.items() if k not in ("files", "format", "version")})
        with pytest.raises(PMError, match="parity probe failed"):
            load_bundle(b, "x", ServeConfig())
    assert load_bundle(llama_bundle, "x", ServeConfig()).causal
