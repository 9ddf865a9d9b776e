"""Out-of-scope rejection (pmserve.rejection), the adaptation gate (pmserve.gate) and the paired t interval
(pmserve.metrics), each against an independent reference: refits row by row, hand-computed quantiles and
intervals, a class the run never saw, and a run trained at once."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pmserve import rejection
from pmserve.gate import GATE_SCALES
from pmserve.metrics import paired_interval, t_quantile
from pmserve.train import TrainConfig, add_tasks, train
from tests.conftest import make_texts, write_tasks
from tests.test_export import cli  # noqa: F401 -- the CLI runner fixture

QUIET = dict(progress=False, log=lambda *_: None)


def test_leave_one_out_scores_equal_refits_without_the_row():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(12, 5, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.arange(12) % 3, 3).double()
    lam = 0.7
    G = H.T @ H
    W = torch.linalg.solve(G + lam * torch.eye(5, dtype=torch.float64), H.T @ Y)
    loo = rejection.loo_ridge_scores(H, Y, G, lam, W)
    for i in range(12):
        keep = torch.arange(12) != i
        Hr, Yr = H[keep], Y[keep]
        Wr = torch.linalg.solve(Hr.T @ Hr + lam * torch.eye(5, dtype=torch.float64), Hr.T @ Yr)
        torch.testing.assert_close(loo[i], H[i] @ Wr)


def test_leave_one_out_cosines_equal_cosines_to_class_sums_without_the_row():
    g = torch.Generator().manual_seed(1)
    H = torch.rand(12, 6, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 3
    Q = H.T @ torch.nn.functional.one_hot(y, 3).double()
    loo = rejection.loo_top_cosines(H, y, Q)
    for i in range(12):
        keep = torch.arange(12) != i
        Qr = H[keep].T @ torch.nn.functional.one_hot(y[keep], 3).double()
        cos = [float(H[i] @ Qr[:, c] / (H[i].norm() * Qr[:, c].norm())) for c in range(3)]
        assert float(loo[i]) == pytest.approx(max(cos), abs=1e-12)
    top = rejection.top_cosines(H, Q)  # without leaving out: no lower than the row's own class column alone
    assert bool((top >= loo - 1e-12).all()) and float(top.max()) <= 1 + 1e-12


def test_threshold_keeps_the_asked_share_of_rows():
    scores = torch.tensor([0.05, 0.21, 0.33, 0.5, 0.61, 0.7, 0.8, 0.9, 0.95, 0.99], dtype=torch.float64)
    counts = rejection.histogram(scores)
    assert counts.sum() == 10
    t = rejection.threshold(counts, 0.8)  # keep 8 of 10: the two lowest go
    assert 0.21 < t <= 0.33
    assert int((scores >= t).sum()) == 8
    assert rejection.threshold(counts, 0.999) <= 0.05  # keep all ten
    assert rejection.threshold(torch.zeros(rejection.BINS, dtype=torch.float64), 0.99) == rejection.ACCEPT_ALL
    s = np.array([[0.9, 0.1], [0.2, 0.3]], dtype=np.float32)
    assert rejection.top_labels(s, ["a", "b"], 0.5) == ["a", rejection.OUT_OF_SCOPE]
    assert rejection.top_labels(s, ["a", "b"], None) == ["a", "b"]


def test_t_quantiles_and_the_paired_interval_by_hand():
    # Student's t 0.975 quantiles as printed in every table
    for df, want in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)
    # differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), se sd / 2, half width 3.182446 * se
    mean, lo, hi = paired_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert (
        mean == 2.5
        and lo == pytest.approx(2.5 - half, abs=1e-6)
        and hi == pytest.approx(2.5 + half, abs=1e-6)
    )
    assert paired_interval([0.3]) == (0.3, -math.inf, math.inf)


def config(data, model, **kw):
    base = dict(
        data=str(data),
        model=str(model),
        epochs=2,
        batch_size=8,
        rank=2,
        fisher_samples=16,
        seed=1,
        lr=3e-2,
        head_lr=5e-2,
        head="ridge",
        ridge_dim=64,
        reject=0.9,
        gate=True,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """(a 3-task run with rejection and the gate, the same grown from 2 tasks by --add, the data root)."""
    root = tmp_path_factory.mktemp("reject")
    data = write_tasks(root / "data", [["animal", "food"], ["tool", "place"], ["animal", "tool"]], 16, 8)
    once = root / "once"
    train(config(data, tiny_model), once, **QUIET)
    first = root / "first"
    for t in ("t0", "t1"):
        shutil.copytree(data / t, first / t)
    grown = root / "grown"
    train(config(first, tiny_model), grown, **QUIET)
    add_tasks(grown, [data / "t2"], **QUIET)
    return once, grown, root


def test_rejection_statistics_and_gated_weights_survive_add_bitwise(runs):
    once, grown, _ = runs
    for name in ("classifier", "merged", "fisher_sums"):
        a = load_file(str(once / "state" / f"{name}.safetensors"))
        b = load_file(str(grown / "state" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    counts = load_file(str(once / "state" / "classifier.safetensors"))["reject_counts"]
    meta = json.loads((once / "state" / "classifier.json").read_text())
    assert meta["reject"] == 0.9 and meta["reject_threshold"] == rejection.threshold(counts, 0.9)
    assert counts.numel() == rejection.BINS  # the same size after any number of tasks


def test_gate_records_its_choice_in_each_task(runs):
    once, grown, _ = runs
    for folder in sorted((once / "tasks").iterdir()):
        info = json.loads((folder / "task.json").read_text())
        gate = info["gate"]
        assert gate["held_out"] == int(32 * 0.2)  # 2 classes x 16 training rows
        assert set(gate["acc"]) == {str(c) for c in GATE_SCALES} and gate["scale"] in GATE_SCALES
        best = max(gate["acc"].values())
        assert gate["acc"][str(gate["scale"])] == best  # the best held-out accuracy, ties to the larger
        assert all(float(c) <= gate["scale"] for c, a in gate["acc"].items() if a == best)
        assert info["reject_threshold"] is not None
        other = json.loads((grown / "tasks" / folder.name / "task.json").read_text())
        assert other["gate"] == gate


def test_an_unseen_class_is_rejected_more_often_than_a_known_one(runs):
    import random

    from pmserve.predict import predict

    once, _, root = runs
    rng = random.Random(5)
    known, unseen = make_texts("food", 40, rng), make_texts("feeling", 40, rng)
    (root / "known.txt").write_text("\n".join(known))
    rows, _ = predict(once, known, provider="cpu")
    rejected_known = sum(r["label"] == rejection.OUT_OF_SCOPE for r in rows)
    rows, _ = predict(once, unseen, provider="cpu")
    rejected_unseen = sum(r["label"] == rejection.OUT_OF_SCOPE for r in rows)
    assert rejected_unseen > rejected_known


def brute_force_fits(run, texts) -> np.ndarray:
    """Each text's largest cosine with a column of the RUN's ridge Q, class by class in float64 numpy, from the
    RUN's merged model's pooled features: the reference for the exported `fit`."""
    from pmserve.heads import load_scorer
    from pmserve.predict import TorchModel

    model = TorchModel.from_merged(run, "cpu")
    ridge = load_scorer(run / "state")
    batch = model.prep.collate(model.encode(texts))
    with torch.no_grad():
        feats = model.model.encoder(**{n: batch[n] for n in model.input_names}).double().numpy()
    h = np.maximum(feats @ ridge.P.double().numpy(), 0)
    Q = ridge.Q.numpy()
    cos = [
        [h[i] @ Q[:, c] / (np.linalg.norm(h[i]) * np.linalg.norm(Q[:, c])) for c in range(Q.shape[1])]
        for i in range(len(h))
    ]
    return np.array(cos).max(1)


def test_bundle_rejects_by_its_fit_output_as_the_run_does(runs, tmp_path, cli):  # noqa: F811
    import random

    from pmserve.export import export_bundle
    from pmserve.predict import OrtModel, predict

    once, _, _ = runs
    bundle = tmp_path / "bundle"
    manifest = export_bundle(once, bundle)
    meta = json.loads((once / "state" / "classifier.json").read_text())
    assert meta["reject_score"] == "cosine"
    assert manifest["reject"] == {
        "threshold": meta["reject_threshold"],
        "label": rejection.OUT_OF_SCOPE,
        "score": "top cosine",
    }
    assert [o["name"] for o in manifest["outputs"]] == ["scores", "fit"]
    assert manifest["outputs"][1]["shape"] == ["batch"]
    texts = make_texts("feeling", 20, random.Random(2)) + make_texts("tool", 20, random.Random(3))
    from_run, _ = predict(once, texts, provider="cpu")
    from_bundle, model = predict(bundle, texts, provider="cpu")
    assert [r["label"] for r in from_bundle] == [r["label"] for r in from_run]
    assert any(r["label"] == rejection.OUT_OF_SCOPE for r in from_bundle)
    assert any(r["label"] != rejection.OUT_OF_SCOPE for r in from_bundle)
    # the bundle's fit is the cosine computed by hand; the label is the rule applied to it; scores stay scores
    rows = OrtModel.from_bundle(bundle, "cpu").scores(texts)
    assert rows.shape == (len(texts), len(model.labels) + 1)
    np.testing.assert_allclose(rows[:, -1], brute_force_fits(once, texts), atol=1e-4)
    assert [r["label"] for r in from_bundle] == [
        y if f >= meta["reject_threshold"] else rejection.OUT_OF_SCOPE
        for y, f in zip((model.labels[k] for k in rows[:, :-1].argmax(1)), rows[:, -1])
    ]
    assert [r["score"] for r in from_bundle] == pytest.approx(rows[:, :-1].max(1).tolist(), abs=1e-6)
    assert [r["fit"] for r in from_bundle] == pytest.approx(rows[:, -1].tolist(), abs=1e-6)
    # eval: accuracy with rejection counts a rejected in-scope request as wrong
    from pmserve.predict import evaluate
    from pmserve.train import run_tests

    res = evaluate(bundle, provider="cpu")
    t = meta["reject_threshold"]
    for task, row in zip(run_tests(once), res["tasks"]):
        r = OrtModel.from_bundle(bundle, "cpu").scores(task.test.inputs)
        answers = [
            model.labels[k] if f >= t else rejection.OUT_OF_SCOPE
            for k, f in zip(r[:, :-1].argmax(1), r[:, -1])
        ]
        want = sum(a == y for a, y in zip(answers, task.test.labels)) / len(answers)
        assert row["acc_with_rejection"] == pytest.approx(want) and want <= row["acc"]
    # the CLI prints the answer and the fit first, then the top label and its score
    res = cli("predict", bundle, *texts[:4], "--provider", "cpu")
    assert res.exit_code == 0, res.stderr
    got = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [g[0] for g in got] == [r["label"] for r in from_bundle[:4]]
    assert [float(g[1]) for g in got] == pytest.approx([r["fit"] for r in from_bundle[:4]], abs=1e-4)
    assert [g[2] for g in got] == [r["top"][0][0] for r in from_bundle[:4]] and [g[4] for g in got] == texts[
        :4
    ]


def test_a_run_saved_before_the_fit_still_rejects_by_its_top_score(runs, tmp_path):
    """A classifier.json without reject_score (written before it) thresholds the top ridge score, as then: its
    bundle has no fit output and says so in its manifest."""
    import random

    from pmserve.export import export_bundle
    from pmserve.predict import OrtModel, predict

    once, _, _ = runs
    old = tmp_path / "old"
    shutil.copytree(once, old)
    meta_path = old / "state" / "classifier.json"
    meta = json.loads(meta_path.read_text())
    del meta["reject_score"]
    meta_path.write_text(json.dumps(meta))
    manifest = export_bundle(old, tmp_path / "bundle")
    assert manifest["reject"]["score"] == "top class score"
    assert [o["name"] for o in manifest["outputs"]] == ["scores"]
    texts = make_texts("feeling", 20, random.Random(2)) + make_texts("tool", 20, random.Random(3))
    rows, model = predict(tmp_path / "bundle", texts, provider="cpu")
    scores = OrtModel.from_bundle(tmp_path / "bundle", "cpu").scores(texts)
    t = meta["reject_threshold"]
    assert [r["label"] for r in rows] == [
        model.labels[k] if s[k] >= t else rejection.OUT_OF_SCOPE for k, s in zip(scores.argmax(1), scores)
    ]
    assert [r["label"] for r in predict(old, texts, provider="cpu")[0]] == [r["label"] for r in rows]


def test_server_answers_out_of_scope_with_scores_only(runs, tmp_path):
    """The served bundle's v2 `label` and /predict answers are predict's; its v2 `scores` are the class
    scores alone (the fit stays inside the server)."""
    import random

    import httpx

    from pmserve.export import export_bundle
    from pmserve.predict import predict, score_all
    from tests.test_serve import infer_body, start

    once, _, _ = runs
    export_bundle(once, tmp_path / "bundle")
    texts = make_texts("feeling", 4, random.Random(2)) + make_texts("tool", 4, random.Random(3))
    want, model = predict(tmp_path / "bundle", texts, provider="cpu")
    proc, url = start(tmp_path / "bundle", "--name", "r")
    try:
        out = httpx.post(f"{url}/v2/models/r/infer", json=infer_body(texts)).json()
        plain = httpx.post(f"{url}/predict", json={"inputs": texts}).json()
    finally:
        proc.kill()
        proc.wait()
    by_name = {o["name"]: o for o in out["outputs"]}
    assert by_name["label"]["data"] == [r["label"] for r in want]
    assert by_name["scores"]["shape"] == [len(texts), len(model.labels)]
    scores = model.split(score_all(model, texts))[0]
    got = np.array(by_name["scores"]["data"], dtype=np.float32).reshape(scores.shape)
    np.testing.assert_allclose(got, scores, rtol=1e-4, atol=1e-5)
    assert [p["label"] for p in plain["predictions"]] == [r["label"] for r in want]
    assert [p["score"] for p in plain["predictions"]] == pytest.approx([r["score"] for r in want], abs=1e-5)
    assert [p["fit"] for p in plain["predictions"]] == pytest.approx([r["fit"] for r in want], abs=1e-5)
