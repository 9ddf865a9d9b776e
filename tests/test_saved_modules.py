"""PEFT SEQ_CLS adapters, the kind most users bring: PEFT trains and saves the classifier head whole
(modules_to_save) beside the LoRA. `pmserve merge` merges those heads (merging/saved.py's rule) into every output
format, and export applies them; the references are built by hand in PyTorch, or are PEFT itself."""

import json

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pmserve.export import ExportOptions, export_bundle
from pmserve.merging import MergeOptions, merge_adapters
from pmserve.predict import OrtModel, predict
from tests.test_deploy_hf import LABELS, TEXTS, bert_config, hf_logits, softmax
from tests.test_export import assert_one_line_error

QUIET = dict(log=lambda *_: None)
TARGETS = ["query", "key", "value", "dense"]
HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def cli():
    from pmserve.cli.deploy import register as deploy
    from pmserve.cli.merge import register as merge

    app = typer.Typer(pretty_exceptions_enable=False)
    deploy(app)
    merge(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def make_base(tok, folder, labels, seed=0, head=True):
    """A BertForSequenceClassification with id2label; head=False drops the head from the checkpoint (a bert-base-*
    whose config.json was set to the classifier: transformers draws a random head at every load)."""
    from transformers import BertForSequenceClassification

    cfg = bert_config(
        vocab_size=tok.vocab_size,
        id2label=dict(enumerate(labels)),
        label2id={y: i for i, y in enumerate(labels)},
        architectures=["BertForSequenceClassification"],
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    if not head:
        w = load_file(str(folder / "model.safetensors"))
        save_file(
            {k: v for k, v in w.items() if not k.startswith("classifier.")}, str(folder / "model.safetensors")
        )
    return folder


def seq_cls_adapter(base, folder, seed, task_type="SEQ_CLS"):
    """get_peft_model(task_type=SEQ_CLS) on the classifier: random lora_B, and the head (modules_to_save) set to
    its own random values, as training would leave them."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import BertForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification.from_pretrained(str(base))
        lora = LoraConfig(task_type=task_type, r=2, lora_alpha=4, target_modules=TARGETS)
        peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                w = m.lora_B["default"].weight
                w.copy_(0.3 * torch.randn(w.shape, generator=g))
        if task_type:
            head = peft_model.base_model.model.classifier.modules_to_save["default"]
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
            head.bias.copy_(torch.randn(head.bias.shape, generator=g))
    peft_model.save_pretrained(str(folder))
    return folder


def adapter_parts(folder):
    """(module -> Delta = scaling * B @ A, parameter -> saved tensor), read from the files by hand."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    deltas, saved = {}, {}
    for k, v in t.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in k:
            deltas[name.removesuffix(".lora_A.weight")] = (
                cfg["lora_alpha"] / cfg["r"] * (t[k.replace("lora_A", "lora_B")] @ v)
            )
        elif ".lora_B." not in k:
            saved[name] = v
    return deltas, saved


def reference_logits(base, coefficients, adapters, head, texts=TEXTS):
    """W_0 + sum_t c_t Delta_t with `head` (parameter -> tensor) as the classifier, in PyTorch by hand."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(base)).eval()
    params = dict(model.named_parameters())
    parts = [adapter_parts(a)[0] for a in adapters]
    with torch.no_grad():
        for m in parts[0]:
            params[f"{m}.weight"] += sum(c * p[m] for c, p in zip(coefficients, parts))
        for k, v in head.items():
            params[k].copy_(v)
        tok = AutoTokenizer.from_pretrained(str(base))
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()


@pytest.fixture(scope="module")
def seq(tiny_model, tmp_path_factory):
    """A 4-label base, 3 SEQ_CLS adapters with different heads, their avg merge in every format, and the bundle
    of the full folder."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("seqcls")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    base = make_base(tok, root / "base", LABELS)
    adapters = [seq_cls_adapter(base, root / f"a{t}", t) for t in range(3)]
    merged = {}
    for fmt in ("full", "delta", "adapter"):
        merged[fmt] = root / f"merged-{fmt}"
        merge_adapters(adapters, merged[fmt], str(base), MergeOptions(method="avg", format=fmt), **QUIET)
    bundle = root / "bundle"
    export_bundle(merged["full"], bundle)
    return SimpleNamespace(root=root, tok=tok, base=base, adapters=adapters, merged=merged, bundle=bundle)


def test_peft_saves_the_head_whole_and_pmserve_reads_it(seq):
    from pmserve.formats.peft import read_adapter, saved_key

    cfg = json.loads((seq.adapters[0] / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    a = read_adapter(seq.adapters[0])
    assert sorted(a.saved) == sorted(HEAD) and a.ignored == []
    # older PEFT kept ".modules_to_save" in the key; both read as the model's parameter name
    assert (
        saved_key("base_model.model.classifier.modules_to_save.weight", ["classifier"]) == "classifier.weight"
    )
    assert saved_key("base_model.model.bert.encoder.layer.0.output.dense.bias", ["classifier"]) is None


def test_avg_full_equals_the_hand_reference_and_its_bundle(seq):
    heads = [adapter_parts(a)[1] for a in seq.adapters]
    avg_head = {k: sum(h[k] for h in heads) / 3 for k in HEAD}
    ref = reference_logits(seq.base, [1 / 3] * 3, seq.adapters, avg_head)
    got = hf_logits(seq.merged["full"], TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(got - hf_logits(seq.base, TEXTS)).max() > 1e-1  # the merged head is not the base's
    report = json.loads((seq.merged["full"] / "merge_report.json").read_text())
    rec = report["saved_modules"]
    assert rec["policy"] == "average" and rec["modules"] == ["classifier"] and rec["labels"] == LABELS
    assert {t["name"]: t["rule"] for t in rec["tensors"]} == dict.fromkeys(HEAD, "task-vector")
    assert any("modules_to_save merged" in n for n in report["notes"])
    assert "modules_to_save merged" in (seq.merged["full"] / "README.md").read_text()
    # the bundle is the HF model, its own head in the graph, labels from id2label
    m = json.loads((seq.bundle / "manifest.json").read_text())
    assert m["labels"] == LABELS and m["head"] == "model" and m["parity"]["passed"]
    probs = softmax(got)
    np.testing.assert_allclose(OrtModel.from_bundle(seq.bundle, "cpu").scores(TEXTS), probs, atol=1e-4)
    rows, _ = predict(seq.bundle, TEXTS, provider="cpu")
    assert [r["label"] for r in rows] == [LABELS[i] for i in probs.argmax(1)]


def test_delta_and_adapter_reproduce_the_full_folder(seq, tmp_path, cli):
    import warnings

    from peft import PeftModel
    from transformers import BertForSequenceClassification

    assert (seq.merged["delta"] / "modules_to_save.safetensors").is_file()
    want = OrtModel.from_bundle(seq.bundle, "cpu").scores(TEXTS)
    for fmt in ("delta", "adapter"):
        res = cli("export", seq.merged[fmt], "--out", tmp_path / fmt, "--base", seq.base, "--quiet")
        assert res.exit_code == 0, res.stderr
        m = json.loads((tmp_path / fmt / "manifest.json").read_text())
        assert m["source"]["kind"] == fmt and m["labels"] == LABELS
        if fmt == "delta":
            assert "modules_to_save.safetensors" in m["source"]["sha256"]
        np.testing.assert_allclose(OrtModel.from_bundle(tmp_path / fmt, "cpu").scores(TEXTS), want, atol=1e-5)
    # plain PEFT loads the adapter output with the merged head
    cfg = json.loads((seq.merged["adapter"] / "adapter_config.json").read_text())
    # the inputs' entries as PEFT wrote them (which names PEFT adds for SEQ_CLS changes between versions)
    given = {
        e
        for a in seq.adapters
        for e in json.loads((a / "adapter_config.json").read_text())["modules_to_save"]
    }
    assert "classifier" in given and cfg["modules_to_save"] == sorted(given)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(str(seq.base)), str(seq.merged["adapter"])
        ).eval()
    with torch.no_grad():
        got = model(**seq.tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(got, hf_logits(seq.merged["full"], TEXTS), atol=1e-5)


def test_single_adapter_export_equals_peft(seq, tmp_path):
    import warnings

    from peft import PeftModel
    from transformers import BertForSequenceClassification

    m = export_bundle(seq.adapters[1], tmp_path / "b", ExportOptions(base=str(seq.base), scores="logits"))
    assert m["source"]["kind"] == "adapter" and m["labels"] == LABELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(str(seq.base)), str(seq.adapters[1])
        ).eval()
    with torch.no_grad():
        ref = model(**seq.tok(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    assert np.abs(ref - hf_logits(seq.base, TEXTS)).max() > 1e-1
    np.testing.assert_allclose(OrtModel.from_bundle(tmp_path / "b", "cpu").scores(TEXTS), ref, atol=1e-4)


def test_head_rule_with_and_without_w0(seq, tmp_path):
    """Where the base holds W_0, task-arithmetic moves the head by the same coefficients as the backbone:
    W_0 + sum_t w_t (S_t - W_0). A base checkpoint without the head (each adapter began from its own random head)
    has no shared W_0: the weighted average, weights normalised to 1; ties averages the heads too."""
    w = [1.0, 1.0, 0.5]
    heads = [adapter_parts(a)[1] for a in seq.adapters]
    w0 = load_file(str(seq.base / "model.safetensors"))
    out = tmp_path / "ta"
    opts = MergeOptions(method="task-arithmetic", format="full", weights=w)
    merge_adapters(seq.adapters, out, str(seq.base), opts, **QUIET)
    got = load_file(str(out / "model.safetensors"))
    for k in HEAD:
        want = w0[k] + sum(c * (h[k] - w0[k]) for c, h in zip(w, heads))
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=0)
    merge_adapters(
        seq.adapters,
        tmp_path / "ties",
        str(seq.base),
        MergeOptions(method="ties", format="full", weights=w),
        **QUIET,
    )
    got = load_file(str(tmp_path / "ties" / "model.safetensors"))
    for k in HEAD:
        torch.testing.assert_close(got[k], sum(c * h[k] for c, h in zip(w, heads)) / 2.5, atol=1e-6, rtol=0)

    headless = make_base(seq.tok, tmp_path / "headless", LABELS, head=False)
    ads = [seq_cls_adapter(headless, tmp_path / f"h{t}", 10 + t) for t in range(2)]
    heads = [adapter_parts(a)[1] for a in ads]
    for fmt in ("full", "delta"):
        opts = MergeOptions(method="task-arithmetic", format=fmt, weights=[1.0, 3.0])
        report = merge_adapters(ads, tmp_path / f"hl-{fmt}", str(headless), opts, **QUIET)
        assert {t["rule"] for t in report["saved_modules"]["tensors"]} == {"average"}
    got = load_file(str(tmp_path / "hl-full" / "model.safetensors"))
    for k in HEAD:
        torch.testing.assert_close(got[k], (heads[0][k] + 3 * heads[1][k]) / 4, atol=1e-6, rtol=0)
    # export of the delta on the headless base: the head comes from modules_to_save.safetensors
    m = export_bundle(
        tmp_path / "hl-delta", tmp_path / "hl-bundle", ExportOptions(base=str(headless), scores="logits")
    )
    assert m["labels"] == LABELS
    got = OrtModel.from_bundle(tmp_path / "hl-bundle", "cpu").scores(TEXTS)
    np.testing.assert_allclose(got, hf_logits(tmp_path / "hl-full", TEXTS), atol=1e-4)


@pytest.mark.parametrize("case", ["lacks", "shape", "base_labels", "bare_base"])
def test_disagreeing_adapters_refused_then_dropped(case, seq, tmp_path, cli):
    ads = list(seq.adapters[:2])
    base = seq.base
    if case == "lacks":
        ads.append(seq_cls_adapter(seq.base, tmp_path / "plain", 7, task_type=None))
        needles = [str(tmp_path / "plain"), "saves no PEFT modules_to_save", "classifier"]
    elif case == "shape":
        other = make_base(seq.tok, tmp_path / "base3", LABELS[:3])
        ads.append(seq_cls_adapter(other, tmp_path / "three", 7))
        needles = [str(tmp_path / "three"), "classifier.weight is [3, 32]", "[4, 32]"]
    elif case == "base_labels":
        base = make_base(seq.tok, tmp_path / "base3", LABELS[:3])
        needles = ["config.json", "id2label has 3 labels", "classifier.weight", "[4, 32]"]
    else:  # the same encoder, bare: no classifier to put the heads in
        from transformers import BertModel

        base = tmp_path / "bare"
        BertModel.from_pretrained(str(seq.base)).save_pretrained(base)
        seq.tok.save_pretrained(base)
        needles = ["classifier", "BertModel", "has no place", "--base"]
    out = tmp_path / "out" / "m"
    res = cli("merge", *ads, "--base", base, "--method", "avg", "--format", "full", "--out", out)
    assert_one_line_error(res, *needles, "--saved-modules drop")
    assert not out.exists() and not list((tmp_path / "out").glob("*"))
    # with --saved-modules drop: merged without them, the base's head kept, and said so
    res = cli(
        "merge",
        *ads,
        "--base",
        base,
        "--method",
        "avg",
        "--format",
        "full",
        "--out",
        out,
        "--saved-modules",
        "drop",
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["saved_modules"] == {"policy": "drop", "tensors": []}
    assert any("modules_to_save dropped" in n for n in report["notes"])
    assert (
        "modules_to_save dropped" in (out / "README.md").read_text()
        and "modules_to_save dropped" in res.output
    )
    if case != "bare_base":
        got, w0 = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
        for k in HEAD:
            torch.testing.assert_close(got[k], w0[k], atol=0, rtol=0)


def test_saved_modules_option_is_checked(seq, tmp_path, cli):
    res = cli("merge", *seq.adapters, "--out", tmp_path / "o", "--saved-modules", "keep")
    assert_one_line_error(res, "--saved-modules", "average, drop")
    assert not (tmp_path / "o").exists()
