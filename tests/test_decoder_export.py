"""Decoder LMs: `pmserve export` to a KV-cache ONNX graph and generation from it, checked against PyTorch and
Hugging Face generate on tiny random Llama and GPT-2 models."""

import json
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import make_causal_lm
from tests.test_cli import assert_one_line_error, pmserve

PROMPTS = ["the cat sat on the mat", "a dog", "big red house and a small blue tree on the sky"]


def hf_generate(folder, prompt_ids, n):
    """Hugging Face generate's greedy tokens for one prompt, up to and including EOS (id 3)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([prompt_ids])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    toks = out[0, len(prompt_ids) :].tolist()
    return toks[: toks.index(3) + 1] if 3 in toks else toks


def generator(bundle):
    from pmserve.generation import Generator

    return Generator.from_bundle(bundle)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_parity_and_bundle(arch, tiny_llama, llama_bundle, tmp_path):
    from pmserve.export import export_version
    from pmserve.formats.bundle import verify_bundle

    if arch == "llama":
        bundle = llama_bundle
    else:  # as the next version in a model repository, as encoders are
        bundle, _ = export_version(make_causal_lm(tmp_path / "gpt2", "gpt2"), tmp_path / "repo" / "gpt2")
        assert bundle == tmp_path / "repo" / "gpt2" / "1"
    m = verify_bundle(bundle)
    assert m["kind"] == "causal-lm" and m["model_type"] == arch
    assert m["graph"] == "traced"  # --graph auto: a GPT-2, and a Llama with heads 8 wide, are traced
    assert m["parity"]["passed"] and m["parity"]["max_rel_diff"] <= 1e-4
    assert m["parity"]["greedy_vs_hf_generate"]["identical"]
    names = [i["name"] for i in m["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in m["outputs"]][:2] == ["logits", "present.0.key"]
    for f in ("model.onnx", "tokenizer.json", "generation_config.json", "probe.json", "README.md"):
        assert f in m["files"], f
    assert m["chat_template"]


def test_greedy_equals_hf_generate_and_batch_equals_alone(tiny_llama, llama_bundle):
    """Greedy ORT generation (alone and as one left-padded batch) gives exactly HF generate's tokens."""
    from pmserve.generation import SamplingParams

    gen = generator(llama_bundle)
    params = SamplingParams(max_new_tokens=24)
    batched = gen.generate(PROMPTS, params)
    for p, seq in zip(PROMPTS, batched):
        want = hf_generate(tiny_llama, gen.encode(p), 24)
        assert seq.tokens == want
        assert gen.generate([p], params)[0].tokens == want


def test_sampling_reproducible_by_seed_and_alone_equals_batched(llama_bundle):
    from pmserve.generation import SamplingParams

    gen = generator(llama_bundle)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=10, seed=7)
    a = gen.generate(PROMPTS, p)
    b = gen.generate(PROMPTS, p)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    # prompt i of a batch samples with seed + i: alone, with that seed, it draws the same tokens
    alone = gen.generate([PROMPTS[1]], SamplingParams(20, 1.0, 0.95, 10, seed=8))[0]
    assert alone.tokens == a[1].tokens
    other = gen.generate(PROMPTS, SamplingParams(20, 1.0, 0.95, 10, seed=123))
    assert [s.tokens for s in other] != [s.tokens for s in a]


def test_sampler_against_softmax():
    """top_k / top_p restrict the softmax as defined; draws follow the restricted distribution."""
    from pmserve.generation import SamplingParams, sample

    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    rng = np.random.default_rng(0)
    draws = [sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(3000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    # top_p 0.7: {0.5, 0.25} reaches 0.75 >= 0.7, so tokens 0 and 1, renormalised to 2/3 and 1/3
    np.testing.assert_allclose(freq, [2 / 3, 1 / 3, 0, 0], atol=0.03)
    draws = [sample(logits, SamplingParams(temperature=1.0, top_k=3), rng) for _ in range(3000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=0.03)
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) == 0


def test_stop_strings_and_streaming(llama_bundle):
    from pmserve.generation import SamplingParams

    gen = generator(llama_bundle)
    full = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=24))[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " ".join(words[1:3])
    seqs = gen.sequences([PROMPTS[0]], SamplingParams(max_new_tokens=24, stop=(stop,)))
    deltas = [d for _, d in gen.stream(seqs)]
    seq = seqs[0]
    assert seq.finish_reason == "stop"
    assert seq.text == full.text[: full.text.index(stop)]
    assert "".join(deltas) == seq.text  # the stream delivers exactly the final text, in order
    assert stop not in "".join(deltas)


def test_requests_join_and_leave_between_steps(llama_bundle):
    """Iteration-level batching: a sequence added mid-way, and one cancelled, leave the others' tokens as alone."""
    from pmserve.generation import DecodeBatch, SamplingParams, Sequence

    gen = generator(llama_bundle)
    params = SamplingParams(max_new_tokens=12)
    alone = {p: gen.generate([p], params)[0].tokens for p in PROMPTS}

    def seq(p):
        return Sequence(gen.encode(p), params, gen.tokenizer, gen.eos_ids)

    batch = DecodeBatch(gen.decoder, gen.pad_id)
    a, b, c = seq(PROMPTS[0]), seq(PROMPTS[1]), seq(PROMPTS[2])
    batch.add([a, b])
    for _ in range(3):
        batch.step()
    batch.add([c])  # joins a running batch with a longer cache
    b.cancel()
    while not (a.finished and c.finished):
        batch.step()
    assert a.tokens == alone[PROMPTS[0]]
    assert c.tokens == alone[PROMPTS[2]]
    assert b.finish_reason == "cancelled"
    batch.step()
    assert len(batch) == 0


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_quantized_export(q, tiny_llama, tmp_path):
    from pmserve.decoder_export import MIN_TOP1
    from pmserve.export import ExportOptions, export_bundle
    from pmserve.generation import SamplingParams

    m = export_bundle(tiny_llama, tmp_path / "b", ExportOptions(quantize=q))
    qp = m["quantization"]["parity_vs_pytorch"]
    assert qp["passed"] and qp["top1_agreement"] >= MIN_TOP1[q]
    assert m["parity"]["passed"]  # the fp32 graph it came from passed the fp32 gate
    seq = generator(tmp_path / "b").generate(["the cat"], SamplingParams(max_new_tokens=4))[0]
    assert seq.tokens


def test_generate_cli(llama_bundle, tiny_llama, tmp_path):
    from pmserve.generation import Generator

    res = pmserve("generate", llama_bundle, PROMPTS[0], "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    gen = Generator.from_bundle(llama_bundle)
    want = gen.tokenizer.decode(hf_generate(tiny_llama, gen.encode(PROMPTS[0]), 8), skip_special_tokens=True)
    assert res.stdout.strip() == want.strip()
    res = pmserve("generate", llama_bundle, "the cat", "--chat", "--temperature", "0.8", "--seed", "1")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "kw, option",
    [
        ({"top_p": 1.5}, "--top-p"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"temperature": -1}, "--temperature"),
    ],
)
def test_bad_sampling_params(kw, option):
    from pmserve.errors import PMError
    from pmserve.generation import SamplingParams

    with pytest.raises(PMError, match=option):
        SamplingParams(**kw).validate()


def test_bad_input_one_line(tiny_model, llama_bundle, tmp_path):
    assert_one_line_error(pmserve("generate", tmp_path / "nope", "hi"), "nope", "does not exist")
    assert_one_line_error(pmserve("generate", llama_bundle, "the cat", "--top-p", "1.5"), "--top-p")
    res = pmserve("export", tiny_model, "--out", tmp_path / "q", "--quantize", "int4")
    assert_one_line_error(res, "--quantize int4")
    assert not (tmp_path / "q").exists()
    assert_one_line_error(pmserve("predict", llama_bundle, "the cat"), "decoder", "pmserve generate")
    res = pmserve("serve", llama_bundle, llama_bundle, "--port", "0")
    assert_one_line_error(res, "--name", "names two bundles")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    res = pmserve("export", broken, "--out", tmp_path / "b")
    assert_one_line_error(res, "broken")
    assert not (tmp_path / "b").exists()


def _past_and_present(m):
    """{name: dtype} of the manifest's graph inputs and outputs."""
    return {v["name"]: v["dtype"] for v in m["inputs"] + m["outputs"]}


def _candidate_check(bundle):
    """The server's child-process check (pmserve.serving.candidate): None when the graph opened and ran there."""
    from pmserve.serving.candidate import Prober
    from pmserve.serving.config import ServeConfig

    prober = Prober()
    try:
        return prober.check(bundle, ServeConfig())
    finally:
        prober.close()


def test_fp16_export_generates_like_fp32(tiny_llama, llama_bundle, tmp_path):
    """--dtype fp16: weights and KV cache float16, logits float32, ids int64; the fp16 graph gated against PyTorch,
    its greedy tokens close to the fp32 bundle's, and a server's checks (in process and in a child) pass."""
    from pmserve.decoder_export import FP16_MIN_TOP1, check_decoder_parity
    from pmserve.export import ExportOptions, export_bundle
    from pmserve.formats.bundle import verify_bundle
    from pmserve.generation import SamplingParams
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle, probe_feed

    out = tmp_path / "f16"
    m = export_bundle(tiny_llama, out, ExportOptions(dtype="fp16"))
    assert m["dtype"] == "fp16" and m["quantization"] is None
    io = _past_and_present(m)
    assert io["logits"] == "float32"
    assert {io[n] for n in ("input_ids", "attention_mask", "position_ids")} == {"int64"}
    kv = {n: t for n, t in io.items() if n.startswith(("past_key_values.", "present."))}
    assert len(kv) == 8 and set(kv.values()) == {"float16"}
    assert m["parity"]["passed"]  # the fp32 graph it came from passed the fp32 gate first
    fp = m["fp16"]["parity_vs_pytorch"]
    assert fp["passed"] and fp["top1_agreement"] >= FP16_MIN_TOP1 and 0 < fp["max_rel_diff"] < 0.05
    assert "fp16" in (out / "README.md").read_text()
    # the graph's weights are float16 (no float32 initializer of any size is left)
    import onnx

    g = onnx.load(str(out / "model.onnx"))
    big = [t for t in g.graph.initializer if np.prod(t.dims) >= 64]
    assert big and {t.data_type for t in big} == {onnx.TensorProto.FLOAT16}

    fp16, fp32 = generator(out), generator(llama_bundle)
    assert fp16.decoder.cache_dtype == np.float16
    params = SamplingParams(max_new_tokens=16)
    a, b = fp16.generate(PROMPTS, params), fp32.generate(PROMPTS, params)
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s.tokens, t.tokens))
    assert same / sum(len(t.tokens) for t in b) >= 0.9, ([s.tokens for s in a], [t.tokens for t in b])
    # the gate replayed on the bundle's graph: a reference computed by PyTorch, independent of the export
    from pmserve.decoder_export import DecoderExport

    class Opts:
        opset, quantize, dtype = 17, None, "fp32"

    ref = DecoderExport(tiny_llama, Opts, lambda *_: None).reference
    again = check_decoder_parity(out / "model.onnx", ref, "fp16")
    assert again["top1_agreement"] == fp["top1_agreement"] and again["max_rel_diff"] == fp["max_rel_diff"]

    assert load_bundle(out, "f16", ServeConfig()).causal
    assert probe_feed(out)["past_key_values.0.key"].dtype == np.float16
    assert _candidate_check(out) is None
    assert verify_bundle(out)["dtype"] == "fp16"
    res = pmserve("generate", out, PROMPTS[0], "--max-new-tokens", "6", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr


def test_fp16_cli(tiny_llama, tmp_path):
    """`pmserve export --dtype fp16` of a decoder says what it wrote; with --quantize it is one line of refusal."""
    res = pmserve("export", tiny_llama, "--out", tmp_path / "f16", "--dtype", "fp16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(causal-lm, fp16, traced graph)" in res.stdout
    assert json.loads((tmp_path / "f16" / "manifest.json").read_text())["dtype"] == "fp16"
    res = pmserve(
        "export", tiny_llama, "--out", tmp_path / "b", "--dtype", "fp16", "--quantize", "int8", cwd=tmp_path
    )
    assert_one_line_error(res, "--quantize int8")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype, quantize", [("fp32", None), ("fp16", None), ("fp32", "int4")])
def test_external_data_past_the_limit(dtype, quantize, tiny_llama, llama_bundle, tmp_path, monkeypatch):
    """A graph over onnx_trace.EXTERNAL_DATA_BYTES (here lowered to 0) keeps its weights in ONE file beside it,
    model.onnx.data, through the trace, the fp16 / quantised conversion and the move into the bundle; the
    bundle passes the gate, generates, serves, and its manifest hashes the data file."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from pmserve import onnx_trace
    from pmserve.errors import PMError
    from pmserve.export import ExportOptions, export_bundle
    from pmserve.formats.bundle import verify_bundle
    from pmserve.generation import SamplingParams
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_bundle

    assert "model.onnx.data" not in verify_bundle(llama_bundle)["files"]  # under the limit: one file
    monkeypatch.setattr(onnx_trace, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "b"
    m = export_bundle(tiny_llama, out, ExportOptions(dtype=dtype, quantize=quantize))
    assert m["parity"]["passed"] and m["dtype"] == dtype
    assert m["files"]["model.onnx.data"]["bytes"] > 1024
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name) == ["model.onnx", "model.onnx.data"]
    g = onnx.load(str(out / "model.onnx"), load_external_data=False)
    places = {
        e.value
        for t in _get_all_tensors(g)
        if uses_external_data(t)
        for e in t.external_data
        if e.key == "location"
    }
    assert places == {"model.onnx.data"}
    assert max(len(t.raw_data) for t in _get_all_tensors(g) if not uses_external_data(t)) < 1024

    gen = generator(out)
    params = SamplingParams(max_new_tokens=12)
    got = [s.tokens for s in gen.generate(PROMPTS, params)]
    if dtype == "fp32" and not quantize:  # the same graph as the one-file bundle: the same tokens
        assert got == [s.tokens for s in generator(llama_bundle).generate(PROMPTS, params)]
    assert all(got)
    assert load_bundle(out, "b", ServeConfig()).causal
    assert _candidate_check(out) is None  # the child opens model.onnx by path: its data file resolves

    data = out / "model.onnx.data"
    assert data.stat().st_mode == (out / "model.onnx").stat().st_mode  # as readable as the graph
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PMError, match="model.onnx.data: altered"):
        verify_bundle(out)
    with pytest.raises(PMError, match="altered"):
        load_bundle(out, "b", ServeConfig())


def test_genai_graph_gated_and_generates_as_hf(genai_llama):
    """The builder's GroupQueryAttention graph passes the fp32 gate, and greedy generation through it (alone, as
    one right-padded batch, with a request joining mid-way and the cache growing past its first capacity) gives
    exactly Hugging Face generate's tokens."""
    from pmserve.formats.bundle import verify_bundle
    from pmserve.generation import DecodeBatch, SamplingParams, Sequence

    folder, bundle = genai_llama
    m = verify_bundle(bundle)
    assert m["graph"] == "genai" and "genai_config.json" in m["files"]  # --graph auto chose it
    assert "position_ids" not in [i["name"] for i in m["inputs"]]
    assert m["parity"]["passed"] and m["parity"]["max_rel_diff"] <= 1e-4
    assert m["parity"]["greedy_vs_hf_generate"]["identical"]
    gen = generator(bundle)
    assert gen.decoder.shared
    params = SamplingParams(max_new_tokens=70)  # past the first capacity (64 positions)
    want = [hf_generate(folder, gen.encode(p), 70) for p in PROMPTS]

    def seq(p):
        return Sequence(gen.encode(p), params, gen.tokenizer, [])  # no EOS: every row runs its 70 tokens

    assert [s.tokens for s in gen.generate(PROMPTS, params)] == [w for w in want]
    batch = DecodeBatch(gen.decoder, gen.pad_id)
    a, b, c = seq(PROMPTS[0]), seq(PROMPTS[1]), seq(PROMPTS[2])
    batch.add([a, b])
    for _ in range(5):
        batch.step()
    b.cancel()
    batch.add([c])  # joins after one row left, with a longer prompt
    while not (a.finished and c.finished):
        batch.step()
    for s, w in ((a, want[0]), (c, want[2])):
        assert s.tokens[: len(w)] == w  # HF stopped at EOS where there was one; ours ran on without it


def test_genai_prompt_feed_matches_prefill(genai_llama):
    """What the server's candidate check runs (a plain session, the manifest alone) gives the prompts' logits."""
    import onnxruntime as ort

    from pmserve.formats.bundle import verify_bundle
    from pmserve.generation import prompt_feed

    _, bundle = genai_llama
    gen = generator(bundle)
    rows = [gen.encode(p) for p in PROMPTS]
    feed = prompt_feed(verify_bundle(bundle), rows, gen.pad_id)
    logits = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], feed
    )[0]
    last = logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    np.testing.assert_allclose(last, gen.decoder.prefill(rows, gen.pad_id)[0], atol=1e-5)


def test_genai_graph_refused_where_it_cannot_run(tiny_llama, tmp_path):
    assert_one_line_error(
        pmserve("export", str(tiny_llama), "--out", str(tmp_path / "b"), "--graph", "genai"),
        "--graph genai: head size 8",
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_genai_graph_for_each_architecture_auto_builds(arch, tmp_path):
    """Each architecture --graph auto sends to the builder (GENAI_ARCHITECTURES) passes the fp32 gate through it."""
    import transformers

    from pmserve.decoder_export import GENAI_ARCHITECTURES
    from pmserve.export import export_bundle

    folder = make_causal_lm(tmp_path / "model", "llama", hidden=64)  # its tokenizer; the model replaced below
    name = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    assert f"{name}ForCausalLM" in GENAI_ARCHITECTURES
    config = getattr(transformers, f"{name}Config")(
        vocab_size=22, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        **({"head_dim": 16} if arch == "qwen3" else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(folder)
    m = export_bundle(folder, tmp_path / "bundle")
    assert m["graph"] == "genai" and m["model_type"] == arch
    assert m["parity"]["passed"] and m["parity"]["greedy_vs_hf_generate"]["identical"]


def test_auto_graph_choice_and_genai_graph_on_cuda_refused(genai_llama, tiny_llama):
    """--graph auto: the builder for a measured architecture with 16-wide heads in fp32, the trace otherwise
    (heads 8 wide, fp16 for GPUs, GPT-2); a GenAI graph asked to run on CUDA is a one-line error, not a guess."""
    from transformers import AutoConfig, GPT2Config

    from pmserve.decoder_export import choose_graph
    from pmserve.errors import PMError
    from pmserve.generation import OrtDecoder

    folder, bundle = genai_llama
    wide = AutoConfig.from_pretrained(folder)
    assert choose_graph("auto", wide, "fp32")[0] == "genai"
    assert choose_graph("auto", wide, "fp16")[0] == "traced"
    assert choose_graph("auto", AutoConfig.from_pretrained(tiny_llama), "fp32")[0] == "traced"
    assert choose_graph("auto", GPT2Config(n_embd=64, n_head=4), "fp32")[0] == "traced"
    assert choose_graph("genai", GPT2Config(), "fp16") == ("genai", "")  # asked for: the gate decides
    with pytest.raises(PMError, match="CPU provider"):
        OrtDecoder(bundle / "model.onnx", "cuda")
