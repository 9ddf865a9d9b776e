"""Models made elsewhere, deployed: a Hugging Face classifier with PEFT adapters merged by `pmserve merge`
(full, delta + base, adapter + base), sentence encoders (mean + normalise, CLS, max), a ViT image classifier,
served embeddings, and bad input. Every reference is the model in PyTorch, computed here by hand."""

import json
import shutil

import httpx
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pmserve.export import ExportOptions, export_bundle
from pmserve.formats import sha256_file
from pmserve.formats.bundle import verify_bundle
from pmserve.formats.merged import inspect_merged
from pmserve.predict import OrtModel, evaluate, predict
from tests.conftest import write_tasks
from tests.test_export import assert_one_line_error
from tests.test_serve import start

LABELS = ["animal", "food", "tool", "place"]
TEXTS = ["dog and cat", "a hammer", "the old city by the river", "bread with cheese and a pear", "joy"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def cli():
    from pmserve.cli.deploy import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def bert_config(**kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "bert",
        vocab_size=kw.pop("vocab_size"),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def hf_logits(folder, texts) -> np.ndarray:
    """The Hugging Face classifier's logits in PyTorch, loaded by transformers itself."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------- a HF classifier and PEFT adapters


@pytest.fixture(scope="module")
def hf(tiny_model, tmp_path_factory):
    """BertForSequenceClassification (id2label set), 3 PEFT LoRA adapters with random B, and their avg merge in
    every format; the full folder is checked against the adapters applied by PEFT itself (each scaled 1/3)."""
    from types import SimpleNamespace

    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pmserve.merging import MergeOptions, merge_adapters

    root = tmp_path_factory.mktemp("hf")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = bert_config(
        vocab_size=tok.vocab_size,
        id2label=dict(enumerate(LABELS)),
        label2id={y: i for i, y in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    base = root / "base"
    BertForSequenceClassification(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    adapters = []
    for t in range(3):
        model = BertForSequenceClassification.from_pretrained(str(base))
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "value", "dense"])
        peft_model = get_peft_model(model, lora)
        g = torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for m in peft_model.modules():
                if isinstance(m, LoraLayer):
                    w = m.lora_B["default"].weight
                    w.copy_(0.3 * torch.randn(w.shape, generator=g))
        adapters.append(root / f"a{t}")
        peft_model.save_pretrained(str(adapters[-1]))
    merged = {}
    for fmt in ("full", "delta", "adapter"):
        merged[fmt] = root / f"merged-{fmt}"
        opts = MergeOptions(method="avg", format=fmt)
        merge_adapters(adapters, merged[fmt], base=str(base), options=opts, log=lambda *_: None)

    # the merged folder equals W_0 with the three adapters active in PEFT, each at 1/3
    model = BertForSequenceClassification.from_pretrained(str(base))
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="t0")
    for t in (1, 2):
        peft_model.load_adapter(str(adapters[t]), adapter_name=f"t{t}")
    peft_model.base_model.set_adapter(["t0", "t1", "t2"])
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for t in range(3):
                m.set_scale(f"t{t}", 1 / 3)
    with torch.no_grad():
        ref = peft_model.eval()(**tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(hf_logits(merged["full"], TEXTS), ref, atol=1e-5)
    assert np.abs(ref - hf_logits(base, TEXTS)).max() > 1e-2  # the adapters change the model

    bundle = root / "bundle"
    export_bundle(merged["full"], bundle)
    return SimpleNamespace(root=root, base=base, adapters=adapters, merged=merged, bundle=bundle)


def test_hf_classifier_bundle_scores_as_the_hf_model(hf):
    m = verify_bundle(hf.bundle)
    assert m["kind"] == "classifier" and m["head"] == "model" and m["scores"] == "softmax"
    assert m["labels"] == LABELS and json.loads((hf.bundle / "labels.json").read_text()) == LABELS
    assert m["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch", 4]}]
    assert m["source"]["architecture"] == "BertForSequenceClassification"
    assert m["source"]["sha256"] == {
        "model.safetensors": sha256_file(hf.merged["full"] / "model.safetensors")
    }
    assert (
        m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["top1_mismatches"] == 0
    )
    assert m["optimization"]["method"] is None  # fp32: no offline fusion by default
    ref = softmax(hf_logits(hf.merged["full"], TEXTS))
    ort = OrtModel.from_bundle(hf.bundle, "cpu")
    np.testing.assert_allclose(ort.scores(TEXTS), ref, atol=1e-4)
    rows, _ = predict(hf.bundle, TEXTS, provider="cpu")
    assert [r["label"] for r in rows] == [LABELS[i] for i in ref.argmax(1)]


def test_hf_classifier_eval_equals_the_hf_models_accuracy(hf, tmp_path, cli):
    data = write_tasks(tmp_path / "data", [["animal", "food"], ["tool", "place"]], n_train=2, n_test=10)
    res = evaluate(hf.bundle, str(data), provider="cpu")
    hits = total = 0
    for t, row in zip(sorted(data.iterdir()), res["tasks"]):
        tests = [json.loads(x) for x in (t / "test.jsonl").read_text().splitlines()]
        pred = hf_logits(hf.merged["full"], [r["text"] for r in tests]).argmax(1)
        ok = sum(LABELS[p] == r["label"] for p, r in zip(pred, tests))
        assert row == {"task": t.name, "n": len(tests), "acc": ok / len(tests)}
        hits, total = hits + ok, total + len(tests)
    assert res["overall"] == hits / total
    out = cli("eval", hf.bundle, data, "--provider", "cpu")
    assert out.exit_code == 0 and f"{hits / total:.4f}" in out.stdout, out.stderr


def test_delta_and_adapter_with_base_equal_the_full_bundle(hf, tmp_path, cli):
    want = OrtModel.from_bundle(hf.bundle, "cpu").scores(TEXTS)
    for fmt in ("delta", "adapter"):
        out = tmp_path / fmt
        res = cli("export", hf.merged[fmt], "--out", out, "--base", hf.base, "--quiet")
        assert res.exit_code == 0, res.stderr
        m = verify_bundle(out)
        assert m["source"]["kind"] == fmt and m["labels"] == LABELS and m["parity"]["passed"]
        delta_file = "merged.safetensors" if fmt == "delta" else "adapter_model.safetensors"
        assert set(m["source"]["sha256"]) == {"model.safetensors", delta_file}
        np.testing.assert_allclose(OrtModel.from_bundle(out, "cpu").scores(TEXTS), want, atol=1e-5)


def test_hf_classifier_fp16_and_logits(hf, tmp_path):
    m = export_bundle(hf.merged["full"], tmp_path / "fp16", ExportOptions(dtype="fp16", scores="logits"))
    assert m["dtype"] == "fp16" and m["scores"] == "logits" and m["parity"]["passed"]
    got = OrtModel.from_bundle(tmp_path / "fp16", "cpu").scores(TEXTS)
    np.testing.assert_allclose(got, hf_logits(hf.merged["full"], TEXTS), atol=1e-2)


# ---------------------------------------------------------------- sentence encoders


def sentence_encoder(tiny_model, folder, pooling: str, normalize: bool):
    """tiny_model with sentence-transformers' files, in the old layout (modules.json, 1_Pooling/config.json with
    pooling_mode_* booleans, Normalize with no folder), as all-MiniLM-L6-v2 ships them."""
    shutil.copytree(tiny_model, folder)
    mods = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        mods.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(mods))
    (folder / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m.startswith(pooling) for m in ("cls_token", "mean_tokens", "max_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return folder


def pooled(folder, texts, pooling: str, normalize: bool) -> np.ndarray:
    """The reference by hand: BertModel's last hidden state, pooled over the attention mask, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    if pooling == "mean":
        x = (h * mask).sum(1) / mask.sum(1)
    elif pooling == "cls":
        x = h[:, 0]
    else:
        x = torch.where(mask > 0, h, torch.full_like(h, -1e30)).max(1).values
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    return x.numpy()


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_sentence_encoder_embedding_bundle(tiny_model, tmp_path, pooling, normalize):
    folder = sentence_encoder(tiny_model, tmp_path / "st", pooling, normalize)
    m = export_bundle(folder, tmp_path / "bundle")
    assert m["kind"] == "embedding" and m["pooling"] == pooling and m["normalize"] is normalize
    assert m["pooling_from"].endswith("1_Pooling/config.json") and m["max_length"] == 48
    assert m["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": ["batch", 32]}]
    assert m["labels"] == [] and not (tmp_path / "bundle" / "labels.json").exists()
    assert m["parity"]["passed"] and m["parity"]["min_cosine"] >= 0.9999
    ref = pooled(folder, TEXTS, pooling, normalize)
    got = OrtModel.from_bundle(tmp_path / "bundle", "cpu").scores(TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert cosines(got, ref).min() >= 0.9999
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    if pooling == "mean":  # sentence-transformers itself reads the folder the same way
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
        np.testing.assert_allclose(got, st, atol=1e-4)


def test_bare_encoder_with_options_and_int8(tiny_model, tmp_path, cli):
    res = cli("export", tiny_model, "--out", tmp_path / "max", "--pooling", "max", "--normalize", "--quiet")
    assert res.exit_code == 0, res.stderr
    m = verify_bundle(tmp_path / "max")
    assert (m["pooling"], m["normalize"], m["pooling_from"]) == ("max", True, "--pooling")
    got = OrtModel.from_bundle(tmp_path / "max", "cpu").scores(TEXTS)
    np.testing.assert_allclose(got, pooled(tiny_model, TEXTS, "max", True), atol=1e-4)
    # int8: reported, not gated: its difference and cosine against PyTorch, no accuracy
    q = export_bundle(tiny_model, tmp_path / "int8", ExportOptions(quantize="int8"))["quantization"]
    assert q["parity_vs_pytorch"]["min_cosine"] > 0.9 and "no accuracy" in q["accuracy"]["note"]
    # predict prints the vector; eval has nothing to evaluate
    res = cli("predict", tmp_path / "max", "dog and cat", "--provider", "cpu")
    assert res.exit_code == 0, res.stderr
    values, text = res.stdout.strip().split("\t")
    assert text == "dog and cat" and len(values.split()) == 32
    np.testing.assert_allclose(np.array(values.split(), float), got[0], atol=1e-5)
    assert_one_line_error(
        cli("eval", tmp_path / "max", "--provider", "cpu"), "embedding", "nothing to evaluate"
    )


def test_embedding_parity_gate_checks_direction(tiny_model, tmp_path):
    """An embedding gate that looked only at |difference| would pass a wide tolerance; the cosine gate does not."""
    import copy

    import pmserve.export as export
    from pmserve.backbone import Pooling
    from pmserve.merged_model import load_inference_model

    model, prep = load_inference_model(tiny_model, attn="eager")
    batches = export.parity_batches(model, prep, None, 48)
    path = tmp_path / "model.onnx"
    export.trace_onnx(model, batches[0], path, ExportOptions().opset)
    same = export.check_parity(path, model, batches, 1e-4)
    assert same["passed"] and same["min_cosine"] >= 0.9999 and same["samples"] == 9
    other = copy.deepcopy(model)
    other.encoder.pool = Pooling("max")  # another direction, at a magnitude the wide tolerance forgives
    res = export.check_parity(path, other, batches, 1e9)
    assert res["passed"] is False and res["min_cosine"] < 0.9999 and res["max_abs_diff"] <= 1e9


def test_merged_sentence_encoder_keeps_its_pooling(tiny_model, tmp_path):
    """`pmserve merge --format full` on a sentence encoder carries its pooling files, so export reads them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from pmserve.merging import MergeOptions, merge_adapters

    base = sentence_encoder(tiny_model, tmp_path / "st", "mean", True)
    peft_model = get_peft_model(
        AutoModel.from_pretrained(str(base)), LoraConfig(r=2, target_modules=["query"])
    )
    peft_model.save_pretrained(str(tmp_path / "a0"))
    out = tmp_path / "full"
    merge_adapters(
        [tmp_path / "a0"], out, str(base), MergeOptions(method="avg", format="full"), lambda *_: None
    )
    assert (out / "1_Pooling" / "config.json").is_file()
    src = inspect_merged(out)
    assert (src.output, src.pooling, src.normalize) == ("embedding", "mean", True)


# ---------------------------------------------------------------- an image classifier


def test_vit_image_classifier(tmp_path, cli):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["cat", "dog", "bird"]
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(labels)),
        label2id={y: i for i, y in enumerate(labels)},
    )
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    ViTForImageClassification(cfg).save_pretrained(folder)
    proc = ViTImageProcessor(size={"height": 8, "width": 8})
    proc.save_pretrained(folder)
    m = export_bundle(folder, tmp_path / "bundle")
    assert m["kind"] == "classifier" and m["labels"] == labels and m["input_kind"] == "image"
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= 1e-4
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[-1])
    model = ViTForImageClassification.from_pretrained(str(folder)).eval()
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    with torch.no_grad():
        ref = softmax(model(**proc(images=images, return_tensors="pt")).logits.numpy())
    res = cli("predict", tmp_path / "bundle", *paths, "--provider", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [r["label"] for r in rows] == [labels[i] for i in ref.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in rows], ref.max(1), atol=1e-4)


# ---------------------------------------------------------------- serving


def test_serve_embedding_and_hf_classifier(hf, tiny_model, tmp_path):
    import tritonclient.http as tc

    folder = sentence_encoder(tiny_model, tmp_path / "st", "mean", True)
    emb = tmp_path / "emb"
    export_bundle(folder, emb)
    want = OrtModel.from_bundle(emb, "cpu").scores(TEXTS)
    labels = [LABELS[i] for i in softmax(hf_logits(hf.merged["full"], TEXTS)).argmax(1)]
    proc, url = start(emb, hf.bundle, "--name", "emb", "--name", "cls")
    try:
        c = tc.InferenceServerClient(url.removeprefix("http://"))
        meta = c.get_model_metadata("emb")
        assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]
        assert meta["parameters"]["kind"] == "embedding" and meta["parameters"]["normalize"] is True
        x = tc.InferInput("text", [len(TEXTS)], "BYTES")
        x.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
        res = c.infer("emb", [x])
        got = res.as_numpy("embedding")
        assert got.shape == (len(TEXTS), 32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        body = httpx.post(f"{url}/embed", json={"inputs": TEXTS}).json()
        assert body["model"] == "emb"
        np.testing.assert_allclose(np.array(body["embeddings"]), want, atol=1e-5)

        assert c.get_model_metadata("cls")["parameters"]["labels"] == LABELS
        res = c.infer("cls", [x])
        assert [b.decode() for b in res.as_numpy("label")] == labels
        plain = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()
        assert plain["model"] == "cls" and [p["label"] for p in plain["predictions"]] == labels
        wrong = httpx.post(f"{url}/embed", json={"inputs": TEXTS, "model": "cls"})
        assert wrong.status_code == 400 and "/predict" in wrong.json()["error"]
        wrong = httpx.post(
            f"{url}/v2/models/emb/infer", json={**_body(TEXTS), "outputs": [{"name": "scores"}]}
        )
        assert wrong.status_code == 400 and "'embedding'" in wrong.json()["error"]
    finally:
        proc.kill()
        proc.wait()


def _body(texts):
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


def test_repository_serves_an_embedding_version(tiny_model, tmp_path):
    """The probe works for embeddings: a repository loads and checks an embedding version like any other."""
    from pmserve.export import export_version
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.repository import Repository

    export_version(tiny_model, tmp_path / "repo" / "enc")
    probe = json.loads((tmp_path / "repo" / "enc" / "1" / "probe.json").read_text())
    assert probe["output"] == "embedding" and np.array(probe["scores"]).shape[1] == 32
    (served,) = Repository(tmp_path / "repo", ServeConfig(threads=1), log=lambda *_: None).load_all()
    assert served.embedding and served.version == "1"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case",
    [
        "not_a_model",
        "model_type",
        "token_head",
        "id2label",
        "pooling_on_classifier",
        "scores_on_embedding",
        "wrong_base",
        "no_base",
    ],
)
def test_bad_input(case, hf, tiny_model, tmp_path, cli):
    out = tmp_path / "out" / "bundle"
    x = tmp_path / "x"
    if case == "not_a_model":
        x.mkdir()
        (x / "weights.bin").write_bytes(b"")
        res, needles = cli("export", x, "--out", out), [str(x), "not a model export can read"]
    elif case in ("model_type", "token_head", "id2label"):
        shutil.copytree(hf.merged["full"], x)
        cfg = json.loads((x / "config.json").read_text())
        if case == "model_type":
            cfg["model_type"] = "gpt2"
            needles = ["config.json", "'gpt2'", "bert", "vit"]
        elif case == "token_head":
            cfg["architectures"] = ["BertForTokenClassification"]
            needles = ["config.json", "BertForTokenClassification", "ForSequenceClassification"]
        else:
            cfg["id2label"] = {"0": "animal", "1": "food", "2": "tool"}
            cfg["label2id"] = {"animal": 0, "food": 1, "tool": 2}
            needles = ["config.json", "id2label has 3 labels", "classifier.weight"]
        (x / "config.json").write_text(json.dumps(cfg))
        res = cli("export", x, "--out", out)
    elif case == "pooling_on_classifier":
        res, needles = (
            cli("export", hf.merged["full"], "--out", out, "--pooling", "cls"),
            ["--pooling", "classifier"],
        )
    elif case == "scores_on_embedding":
        res, needles = (
            cli("export", tiny_model, "--out", out, "--scores", "logits"),
            ["--scores", "embedding"],
        )
    elif case == "wrong_base":
        res = cli("export", hf.merged["delta"], "--out", out, "--base", tiny_model)
        needles = ["--base", "fingerprint"]
    else:
        shutil.copytree(hf.merged["delta"], x)
        report = json.loads((x / "merge_report.json").read_text())
        report["base"].update(path=str(tmp_path / "gone"), model=str(tmp_path / "gone"))
        (x / "merge_report.json").write_text(json.dumps(report))
        res, needles = cli("export", x, "--out", out), ["--base", "gone"]
    assert_one_line_error(res, *needles)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
