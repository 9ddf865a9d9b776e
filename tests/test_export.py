"""Deployment on a tiny model: ONNX bundle parity, accuracy equal to PyTorch and to the RUN, predict, bench, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pmserve.bench import BenchConfig, run_bench
from pmserve.export import ExportOptions, export_bundle
from pmserve.formats.bundle import verify_bundle
from pmserve.formats.merged import inspect_merged
from pmserve.merged_model import load_inference_model, load_unmerged_model, scorer_module
from pmserve.predict import OrtModel, evaluate
from pmserve.train import TrainConfig, train
from tests.conftest import write_tasks

HEAD = "ridge"  # the classifier with the most in the graph: random ReLU projection, then ridge weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine OpenMP's spinning threads cost far more than they give."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = write_tasks(root / "data", [["animal", "food"], ["tool", "place"], ["time", "feeling"]])
    cfg = TrainConfig(
        data=str(data),
        model=str(tiny_model),
        epochs=1,
        batch_size=8,
        rank=2,
        fisher_samples=16,
        seed=1,
        lr=3e-2,
        head_lr=5e-2,
        head=HEAD,
        ridge_dim=64,
    )
    train(cfg, root / "run", progress=False, log=lambda *_: None)
    return root / "run"


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(run, out)
    return out


@pytest.fixture()
def cli():
    from pmserve.cli.deploy import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *needles):
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_classifier_modules_score_like_the_classifiers():
    from pmserve.heads import LabelHead, Prototypes, Ridge

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=g)
    labels = [f"c{i % 4}" for i in range(40)]
    scorers = []
    for kind in ("linear", "cosine"):
        h = LabelHead(8, kind)
        h.add_labels(["c0", "c1", "c2", "c3"], g)
        scorers.append(h)
    p = Prototypes(8)
    p.update(feats, labels)
    r = Ridge(8, size=16, seed=3)
    r.fit(feats, labels)
    for s in [*scorers, p, r]:
        torch.testing.assert_close(scorer_module(s)(feats), s.scores(feats).float(), atol=1e-4, rtol=1e-4)


def test_bundle_graph_files_and_parity(run, bundle):
    m = verify_bundle(bundle)
    src = inspect_merged(run)
    assert {"model.onnx", "labels.json", "tokenizer.json"} <= set(m["files"])
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert all(i["shape"] == ["batch", "sequence"] for i in m["inputs"])
    assert m["outputs"] == [{"name": "scores", "dtype": "float32", "shape": ["batch", 6]}]
    assert m["labels"] == src.labels and m["head"] == HEAD
    metrics = json.loads((run / "metrics.json").read_text())
    assert m["alphas"] == metrics["alphas"] and m["source"]["kind"] == "run"
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= 1e-4
    assert m["optimization"]["method"] is None  # fp32: no offline fusion by default (slower on CPUs)
    import onnx

    graph = onnx.load(str(bundle / "model.onnx")).graph
    names = [n.name for n in graph.node] + [i.name for i in graph.initializer]
    assert not any("lora" in n.lower() for n in names)  # merged weights baked in: no LoRA branch left
    # dynamic axes: other batch and sequence sizes than the export's, padding included
    model, prep = load_inference_model(run)
    ort = OrtModel.from_bundle(bundle, "cpu")
    for texts in (["dog"], ["hammer a saw of the old town", "cat", "joy and love and calm awe by the lake"]):
        with torch.no_grad():
            ref = model.scores(prep(texts)).numpy()
        np.testing.assert_allclose(ort.scores(texts), ref, atol=1e-4)


def test_bundle_accuracy_equals_pytorch_and_the_run(run, bundle):
    onnx_res, torch_res = evaluate(bundle, provider="cpu"), evaluate(run, provider="cpu")
    assert onnx_res["backend"] == "onnxruntime" and torch_res["backend"] == "pytorch"
    final = json.loads((run / "metrics.json").read_text())["by_head"][HEAD]["acc_matrix"][-1]
    assert [t["acc"] for t in onnx_res["tasks"]] == [t["acc"] for t in torch_res["tasks"]]
    assert [t["acc"] for t in onnx_res["tasks"]] == pytest.approx(final)


def test_full_merged_folder_exports_like_the_run(run, bundle, tmp_path):
    # what `pmserve merge --format full` writes: a HF model with W_hat, its tokenizer, the classifier, labels
    src = inspect_merged(run)
    model, prep = load_inference_model(src)
    full = tmp_path / "full"
    model.encoder.model.save_pretrained(full)
    prep.save(full)
    for f in ("classifier.json", "classifier.safetensors"):
        shutil.copy(src.classifier_dir / f, full / f)
    (full / "labels.json").write_text(json.dumps(src.labels))
    facts = {"max_length": src.max_length, "data": src.data, "seed": 1}
    (full / "pmserve_merge.json").write_text(json.dumps(facts))
    out = tmp_path / "bundle"
    m = export_bundle(full, out)
    assert m["source"]["kind"] == "full" and m["parity"]["passed"]
    assert evaluate(out, provider="cpu")["tasks"] == evaluate(bundle, provider="cpu")["tasks"]


def test_fp16_and_int8_bundles(run, tmp_path):
    m16 = export_bundle(run, tmp_path / "fp16", ExportOptions(dtype="fp16"))
    assert m16["dtype"] == "fp16" and m16["parity"]["passed"] and m16["parity"]["tolerance"] == 1e-2
    assert m16["optimization"]["fused"].get("Attention")  # fp16 (GPUs): ORT's transformer fusion by default
    m8 = export_bundle(run, tmp_path / "int8", ExportOptions(quantize="int8"))
    q = m8["quantization"]
    assert m8["optimization"]["method"] is None  # int8 (CPUs): the plain graph quantised, by default
    assert m8["parity"]["passed"]  # checked on the fp32 graph, before quantising
    acc = q["accuracy"]
    assert acc["drop"] == pytest.approx(acc["fp32"]["mean"] - acc["int8"]["mean"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert evaluate(tmp_path / "int8", provider="cpu")["mean"] == pytest.approx(q["accuracy"]["int8"]["mean"])


def test_parity_failure_exits_nonzero_and_leaves_no_bundle(run, tmp_path, cli, monkeypatch):
    import pmserve.export

    monkeypatch.setitem(pmserve.export.PARITY_TOL, "fp32", -1.0)  # any difference, even 0, now fails
    res = cli("export", run, "--out", tmp_path / "b")
    assert_one_line_error(res, "parity check failed", "no bundle written")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_predict_cli_texts_and_jsonl(run, bundle, tmp_path, cli):
    texts = ["dog the cat", "hammer a saw", "joy of love"]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    res = cli("predict", bundle, *texts[:2], f, "--provider", "cpu", "--top-k", "2")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5
    model, prep = load_inference_model(run)
    with torch.no_grad():
        expected = [model.labels[i] for i in model.scores(prep(texts)).argmax(1).tolist()]
    got = [line.split("\t") for line in lines]
    assert [g[0] for g in got] == expected[:2] + expected
    assert all(len(g) == 5 and float(g[1]) >= float(g[3]) for g in got)  # label score label score input
    res = cli("eval", bundle, "--provider", "cpu")
    assert res.exit_code == 0 and "mean over tasks" in res.stdout, res.stderr


def test_unmerged_peft_model_equals_merged(run):
    src = inspect_merged(run)
    merged, prep = load_inference_model(src)
    unmerged = load_unmerged_model(src)
    batch = prep(["dog the cat", "hammer a saw of the old town", "joy"])
    with torch.no_grad():
        torch.testing.assert_close(unmerged.scores(batch), merged.scores(batch), atol=1e-5, rtol=1e-5)


def test_bench_json_side_by_side(bundle, tmp_path, cli):
    out = tmp_path / "bench.json"
    shapes = ["--batch-sizes", "1,2", "--seq-lens", "4,8"]
    res = cli("bench", bundle, *shapes, "--warmup", "1", "--runs", "3", "--json", out)
    assert res.exit_code == 0, res.stderr
    r = json.loads(out.read_text())
    assert set(r["backends"]) == {"onnxruntime", "torch-merged", "torch-base", "peft-unmerged"}
    assert len(r["results"]) == 4 * 4
    assert all(x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] and x["throughput"] > 0 for x in r["results"])
    assert all(x["n"] == 3 for x in r["results"])
    assert {"ort_over_torch", "merged_over_base", "peft_over_merged"} <= set(r["summary"][0])
    # a merged folder works too: exported to a temporary bundle first
    merged = run_bench(
        r["source"]["path"], BenchConfig([1], [4], warmup=0, runs=1, backends=["onnxruntime", "torch-merged"])
    )
    assert [x["backend"] for x in merged["results"]] == ["onnxruntime", "torch-merged"]


def test_bench_times_each_backend_in_blocks(bundle, monkeypatch):
    """Each round runs every backend for a block (one untimed call, then up to BENCH_BLOCK timed ones), in a fresh
    order each round, so no call is timed right after another backend's; --runs timed calls in all."""
    from pmserve import bench
    from pmserve import defaults as D

    calls = []

    def recording(cfg, *args):
        return [bench._Runner(n, lambda feed: None, lambda n=n: calls.append(n), n) for n in ("a", "b", "c")]

    monkeypatch.setattr(bench, "_make_runners", recording)
    monkeypatch.setattr(D, "BENCH_BLOCK", 4)
    r = run_bench(bundle, BenchConfig([1], [4], warmup=2, runs=10, backends=["onnxruntime"]))
    assert [x["n"] for x in r["results"]] == [10, 10, 10]
    assert calls[:6] == ["a", "b", "c"] * 2, "the warm-up"
    k = 6
    for timed in (4, 4, 2):  # BENCH_BLOCK 4: blocks of 4, 4 and 2 timed calls, each after 1 untimed one
        n = timed + 1
        seg = calls[k : k + 3 * n]
        blocks = [seg[i : i + n] for i in range(0, 3 * n, n)]
        assert all(len(set(b)) == 1 for b in blocks), seg
        assert sorted(b[0] for b in blocks) == ["a", "b", "c"], seg
        k += 3 * n
    assert k == len(calls)


@pytest.mark.parametrize(
    "case",
    [
        "plain_model",
        "not_a_model",
        "missing_file",
        "altered_file",
        "no_manifest",
        "image_for_text",
        "jsonl_field",
        "out_exists",
        "bad_dtype",
        "seq_too_long",
        "unknown_label",
    ],
)
def test_bad_input(case, run, bundle, tiny_model, tmp_path, cli):
    b = tmp_path / "b"
    if case in ("missing_file", "altered_file", "no_manifest"):
        shutil.copytree(bundle, b)
    if case == "plain_model":
        # an encoder exports as an embedding model (test_deploy_hf); a bad --pooling is refused
        res, needles = cli("export", tiny_model, "--out", b, "--pooling", "sum"), ["--pooling", "'sum'"]
    elif case == "not_a_model":
        (tmp_path / "x").mkdir()
        res, needles = cli("export", tmp_path / "x", "--out", b), ["not a model export can read"]
    elif case == "missing_file":
        (b / "labels.json").unlink()
        res, needles = cli("predict", b, "dog"), ["labels.json", "missing"]
    elif case == "altered_file":
        raw = bytearray((b / "model.onnx").read_bytes())
        raw[len(raw) // 2] ^= 1  # same size, one bit flipped
        (b / "model.onnx").write_bytes(bytes(raw))
        res, needles = cli("eval", b), ["model.onnx", "sha256"]
    elif case == "no_manifest":
        (b / "manifest.json").unlink()
        res, needles = cli("predict", b, "dog"), ["manifest.json"]
    elif case == "image_for_text":
        (tmp_path / "cat.png").write_bytes(b"\x89PNG")
        res, needles = cli("predict", bundle, tmp_path / "cat.png"), ["cat.png", "reads text"]
    elif case == "jsonl_field":
        (tmp_path / "x.jsonl").write_text(json.dumps({"image": "cat.png"}) + "\n")
        res, needles = cli("predict", bundle, tmp_path / "x.jsonl"), ["x.jsonl", "line 1", "'image'"]
    elif case == "out_exists":
        res, needles = cli("export", run, "--out", bundle), [str(bundle), "exists"]
    elif case == "bad_dtype":
        res, needles = cli("export", run, "--out", b, "--dtype", "int4"), ["--dtype"]
    elif case == "seq_too_long":
        res, needles = cli("bench", bundle, "--seq-lens", "1000"), ["--seq-lens", "1000", "positions"]
    else:
        data = write_tasks(tmp_path / "other", [["animal", "food"]], n_train=2, n_test=2)
        (data / "t0" / "test.jsonl").write_text(json.dumps({"text": "dog", "label": "zebra"}) + "\n")
        (data / "t0" / "train.jsonl").write_text(json.dumps({"text": "dog", "label": "zebra"}) + "\n")
        res, needles = cli("eval", bundle, data), ["zebra", "not one of the model's 6 classes"]
    assert_one_line_error(res, *needles)
    assert not b.exists() or case in ("missing_file", "altered_file", "no_manifest")


# ---------------------------------------------------------------- the parity gate fed a real difference
#
# The ridge classifier scores relu(feats @ P) @ W. Adding c to row u of W adds c * relu(feats @ P)[:, u] to EVERY
# class's score: the same amount for all classes (top-1 unchanged), of one sign (the sign of c), and exactly 0 for
# inputs whose unit u is inactive. The batches are chosen so that unit u is inactive on every input of the first
# two and active on one input of the last, so the two models differ only there. A gate that looked only at
# batches[0], took a signed maximum of one sign, or relied on top-1 changes would pass; check_parity must not.

GATE_SHIFT = 1e-2  # the largest score difference the perturbation makes: 100x the fp32 tolerance


@pytest.fixture(scope="module")
def gate(run, tmp_path_factory):
    """The run's model traced to ONNX, a ridge unit u and three batches with u active only in the last one."""
    from pathlib import Path
    from types import SimpleNamespace

    import pmserve.export as export

    model, prep = load_inference_model(run, attn="eager")  # as export_bundle loads it
    data = Path(inspect_merged(run).data)
    lines = [x for f in sorted(data.glob("*/test.jsonl")) for x in f.read_text().splitlines()]
    texts = [json.loads(x)["text"] for x in lines] + export.SAMPLE_TEXTS

    def pre_activations(batch):  # ridge's relu(feats @ P) before the relu, [inputs, units]
        with torch.no_grad():
            return model.encoder(**{n: batch[n] for n in model.input_names}) @ model.classifier.projection

    pre = pre_activations(prep(texts))
    margin = 1e-3 * float(pre.abs().max())
    best = None
    for u in range(pre.shape[1]):
        off = [t for t, p in zip(texts, pre[:, u].tolist()) if p < -margin]
        top = float(pre[:, u].max())
        if len(off) >= 6 and top > margin and (best is None or top > best[2]):
            best = (u, off, top, texts[int(pre[:, u].argmax())])
    assert best is not None, "no ridge unit is off for 6 texts and on for another"
    unit, off, _, on = best
    batches = [prep(off[:4]), prep(off[4:5]), prep([off[5], on])]
    act = [torch.relu(pre_activations(b)[:, unit]) for b in batches]
    assert float(act[0].max()) == 0.0 and float(act[1].max()) == 0.0 and float(act[2].max()) > 0.0
    path = tmp_path_factory.mktemp("gate") / "model.onnx"
    export.trace_onnx(model, batches[0], path, ExportOptions().opset)  # the default opset
    return SimpleNamespace(model=model, path=path, batches=batches, unit=unit, act=float(act[2].max()))


def _ort_scores(path, batches) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(["scores"], {n: b[n].numpy() for n in names})[0] for b in batches]


def test_parity_gate_passes_the_unperturbed_model(gate):
    import pmserve.export as export

    tol = export.PARITY_TOL["fp32"]
    for batches in (gate.batches, *([b] for b in gate.batches)):
        res = export.check_parity(gate.path, gate.model, batches, tol)
        assert res["passed"] and res["max_abs_diff"] <= tol and res["top1_mismatches"] == 0, res
    assert export.check_parity(gate.path, gate.model, gate.batches, tol)["samples"] == 4 + 1 + 2


@pytest.mark.parametrize(
    "side,ort_lower",
    [("pytorch", True), ("onnx", True), ("pytorch", False)],
    ids=["pytorch_perturbed-ort_lower", "onnx_perturbed-ort_lower", "pytorch_perturbed-ort_higher"],
)
def test_parity_gate_fails_on_a_difference_only_in_a_later_batch(gate, side, ort_lower, tmp_path):
    import copy

    import onnx
    from onnx import numpy_helper

    import pmserve.export as export

    tol = export.PARITY_TOL["fp32"]
    shift = GATE_SHIFT / gate.act  # to add to row `unit` of the ridge weights: the top score moves GATE_SHIFT
    model, path = gate.model, gate.path
    if side == "pytorch":  # PyTorch's scores go up (ORT's lower than PyTorch's) or down
        model = copy.deepcopy(gate.model)
        model.classifier.weight[gate.unit] += shift if ort_lower else -shift
    else:  # the graph's ridge weights changed instead
        proto = onnx.load(str(gate.path))
        w = gate.model.classifier.weight.numpy()
        hits = [i for i in proto.graph.initializer if np.array_equal(numpy_helper.to_array(i), w)]
        assert len(hits) == 1, "the ridge weights are not one initializer of the graph"
        arr = numpy_helper.to_array(hits[0]).copy()
        arr[gate.unit] += -shift if ort_lower else shift
        hits[0].CopyFrom(numpy_helper.from_array(arr, hits[0].name))
        path = tmp_path / "perturbed.onnx"
        onnx.save(proto, str(path))

    # the premise, measured: no difference in batches 0 and 1; in batch 2 one sign, the same for every class
    with torch.no_grad():
        ref = [model.scores(b).numpy() for b in gate.batches]
    got = _ort_scores(path, gate.batches)
    diffs = [r - g for r, g in zip(ref, got)]  # PyTorch - ORT
    assert max(float(np.abs(d).max()) for d in diffs[:2]) <= tol  # a gate reading batches[0] (or [:2]) passes
    d = diffs[2] if ort_lower else -diffs[2]  # the shift's direction: >= 0 up to float noise
    assert float(d.min()) > -tol and float(d.max()) == pytest.approx(GATE_SHIFT, abs=tol)
    wrong_sign = -d  # what max(ORT - PyTorch) (ort_lower) or max(PyTorch - ORT) (ort_higher) would report
    assert max(float(wrong_sign.max()), *(float(np.abs(x).max()) for x in diffs[:2])) <= tol
    assert (ref[2].argmax(1) == got[2].argmax(1)).all()  # top-1 agrees: only the score tolerance can catch it

    res = export.check_parity(path, model, gate.batches, tol)
    assert res["passed"] is False and res["max_abs_diff"] > tol, res
    assert res["max_abs_diff"] == pytest.approx(GATE_SHIFT, abs=tol)  # the absolute maximum, not a mean
    assert res["top1_mismatches"] == 0 and res["samples"] == 7
    # the difference is in batch index 2: the first two alone pass, the later one alone fails
    assert export.check_parity(path, model, gate.batches[:2], tol)["passed"] is True
    alone = export.check_parity(path, model, gate.batches[2:], tol)
    assert alone["passed"] is False and alone["max_abs_diff"] == pytest.approx(GATE_SHIFT, abs=tol)
