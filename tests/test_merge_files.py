"""`pmserve merge` on files: it replays a run's merges exactly, its outputs load in PEFT and transformers, the peer
methods equal PEFT's merge_utils, and bad inputs give one PMError naming the file with no OUT left behind."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pmserve.errors import PMError
from pmserve.merging import MergeOptions, merge_adapters
from pmserve.tensor_io import SafetensorsWriter, TensorSpec
from tests.conftest import write_tasks

QUIET = dict(log=lambda *_: None)


def _auto_model(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), add_pooling_layer=False).eval()


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pm_run(tiny_model, tmp_path_factory) -> Path:
    """A real 3-task pm run on the tiny model (scaling lora_alpha / r = 2, a prototype classifier)."""
    from pmserve.train import TrainConfig, train

    root = tmp_path_factory.mktemp("merge-run")
    data = write_tasks(root / "data", [["animal", "food"], ["tool", "place"], ["time", "feeling"]], 12, 4)
    cfg = TrainConfig(
        data=str(data),
        model=str(tiny_model),
        epochs=1,
        batch_size=8,
        rank=2,
        lora_alpha=4.0,
        fisher_samples=8,
        seed=1,
        lr=3e-2,
        head="prototype",
        keep_fisher=True,  # the offline pm merge computes alphas again from these
    )
    train(cfg, root / "run", progress=False, log=lambda *_: None)
    return root / "run"


def _foreign(tiny_model, folder: Path, seed: int, rank: int, alpha: float, targets=("key", "value")) -> Path:
    """A PEFT adapter trained elsewhere: random B so Delta != 0, no pmserve metadata, no Fisher."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            _auto_model(tiny_model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
        )
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def foreign(tiny_model, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("foreign")
    return [
        _foreign(tiny_model, root / "a", 0, 2, 2.0),
        _foreign(tiny_model, root / "b", 1, 4, 8.0),
        _foreign(tiny_model, root / "c", 2, 3, 3.0),
    ]


def _deltas(folder: Path, scaling: float) -> dict[str, torch.Tensor]:
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            m = k[len("base_model.model.") : -len(".lora_A.weight")]
            out[m] = scaling * (t[k.replace("lora_A", "lora_B")] @ a)
    return out


def test_offline_pm_replays_the_run_exactly(pm_run, tmp_path):
    metrics = json.loads((pm_run / "metrics.json").read_text())
    rep = merge_adapters([pm_run], tmp_path / "d", options=MergeOptions("pm", "delta"), **QUIET)
    assert rep["fisher"] == "files" and rep["alphas"] == pytest.approx(metrics["alphas"], abs=1e-6)
    ours, theirs = (
        load_file(str(tmp_path / "d" / "merged.safetensors")),
        load_file(str(pm_run / "state" / "merged.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    report = json.loads((tmp_path / "d" / "merge_report.json").read_text())
    assert [i["kind"] for i in report["inputs"]] == ["chained"] * 3
    assert all(len(i["sha256"]["fisher.safetensors"]) == 64 for i in report["inputs"])
    assert set(report["modules"]) == set(theirs) and report["base"]["fingerprint"]
    assert json.loads((tmp_path / "d" / "labels.json").read_text()) == report["labels"]
    # the task folders one by one are the same sequence as the RUN
    tasks = sorted(p for p in (pm_run / "tasks").iterdir() if p.is_dir())
    rep2 = merge_adapters(tasks, tmp_path / "d2", options=MergeOptions("pm", "delta"), **QUIET)
    assert rep2["alphas"] == rep["alphas"]


def test_adapter_output_is_plain_peft_and_reproduces_the_merge(pm_run, tiny_model, tmp_path):
    from peft import PeftModel

    from pmserve.heads import load_scorer

    merge_adapters([pm_run], tmp_path / "a", options=MergeOptions("pm", "adapter"), **QUIET)
    merged = load_file(str(pm_run / "state" / "merged.safetensors"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6.0  # three rank-2 LoRAs, scaling folded into B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(_auto_model(tiny_model), str(tmp_path / "a")).eval()
    ref = _auto_model(tiny_model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for k, d in merged.items():
            mods[k].weight += d
    x = {"input_ids": torch.tensor([[2, 7, 9, 11, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**x).last_hidden_state, ref(**x).last_hidden_state, rtol=0, atol=1e-5
        )
    assert load_scorer(tmp_path / "a").labels == json.loads((tmp_path / "a" / "labels.json").read_text())


def test_full_output_sharded_loads_with_from_pretrained(pm_run, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from pmserve.heads import load_scorer

    out = tmp_path / "f"
    merge_adapters(
        [pm_run],
        out,
        base=str(tiny_model),
        options=MergeOptions("pm", "full", max_shard_size="30KB"),
        **QUIET,
    )
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    merged = load_file(str(pm_run / "state" / "merged.safetensors"))
    base, full = _weights(_auto_model(tiny_model)), _weights(_auto_model(out))
    assert base.keys() == full.keys()
    for k, w in base.items():
        want = w + merged[k[: -len(".weight")]] if k[: -len(".weight")] in merged else w
        torch.testing.assert_close(full[k], want, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(str(out))("dog cat")["input_ids"]
    labels = json.loads((out / "labels.json").read_text())
    assert load_scorer(out).labels == labels and len(labels) == 6
    meta = json.loads((out / "pmserve_merge.json").read_text())
    assert meta["method"] == "pm" and len(meta["alphas"]) == 3


def test_independent_adapters_and_peer_methods_match_peft(foreign, tmp_path):
    from peft.utils import merge_utils as mu

    deltas = [_deltas(foreign[0], 1.0), _deltas(foreign[1], 2.0), _deltas(foreign[2], 1.0)]
    mods = sorted(deltas[0])

    def run(name, method, **kw):
        merge_adapters(foreign, tmp_path / name, options=MergeOptions(method, "delta", **kw), **QUIET)
        rep = json.loads((tmp_path / name / "merge_report.json").read_text())
        return load_file(str(tmp_path / name / "merged.safetensors")), rep

    avg, _ = run("avg", "avg")
    pm, rep = run("pm", "pm")  # no Fisher: identity Hessian, which for independent adapters is the average
    assert rep["fisher"] == "identity" and any("identity" in n for n in rep["notes"])
    assert rep["alphas"] == pytest.approx([1, 1 / 2, 1 / 3], abs=1e-6)
    lin, _ = run("lin", "linear", weights=[1.0, 2.0, 1.0])
    ta, _ = run("ta", "task-arithmetic", weights=[0.5, 1.0, -0.25])
    w = torch.tensor([0.5, 1.0, -0.25])
    for m in mods:
        ds = [d[m] for d in deltas]
        torch.testing.assert_close(avg[m], sum(ds) / 3, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pm[m], avg[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin[m], (ds[0] + 2 * ds[1] + ds[2]) / 4, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ta[m], mu.task_arithmetic(ds, w), rtol=1e-5, atol=1e-6)
    for method, fn in (("ties", mu.ties), ("dare-linear", mu.dare_linear), ("dare-ties", mu.dare_ties)):
        got, rep = run(method, method, weights=[1.0, 0.5, 1.0], density=0.4, seed=3)
        assert rep["density"] == 0.4
        for i, m in enumerate(
            sorted(mods, key=lambda s: [int(p) if p.isdigit() else p for p in s.split(".")])
        ):
            torch.manual_seed(3 * 1_000_003 + i)
            want = fn([d[m] for d in deltas], torch.tensor([1.0, 0.5, 1.0]), 0.4)
            torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)


def test_ties_in_row_blocks_equals_peft(foreign, tmp_path, monkeypatch):
    """TIES streamed over row blocks of the task vectors (a block of 1 to 3 rows here) against peft's ties."""
    from peft.utils import merge_utils as mu

    import pmserve.merging.execute as mf

    monkeypatch.setattr(mf, "TIES_BLOCK", 288)  # over 3 tasks: 3 rows of 32 (a partial last block), 1 of 64
    deltas = [_deltas(foreign[0], 1.0), _deltas(foreign[1], 2.0), _deltas(foreign[2], 1.0)]
    for density in (0.3, 0.8):
        rep = merge_adapters(
            foreign, tmp_path / f"t{density}", options=MergeOptions("ties", density=density), **QUIET
        )
        got = load_file(str(tmp_path / f"t{density}" / "merged.safetensors"))
        for m in deltas[0]:
            want = mu.ties([d[m] for d in deltas], torch.ones(3), density)
            torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)
            norms = [float(d[m].norm()) for d in deltas]
            assert rep["modules"][m]["tasks"] == pytest.approx(norms, rel=1e-5)


def _brute_force_fisher(
    tiny_model: Path, adapter: Path, task, scale: float = 16.0
) -> dict[str, torch.Tensor]:
    """The --data Fisher by other means: plain PEFT, one sample at a time, torch.autograd.grad of
    cross-entropy over the task's classes of cosine logits to the class means of the adapted model's features."""
    import torch.nn.functional as F
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_auto_model(tiny_model), str(adapter)).eval()
    weights = {
        n[len("base_model.model.") :]: m.base_layer.weight
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    for w in weights.values():
        w.requires_grad_(True)

    def feature(text):
        enc = tok([text], return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return ((h * mask).sum(1) / mask.sum(1))[0]

    xs, ys = task.train.inputs, task.train.labels
    with torch.no_grad():
        feats = torch.stack([feature(x) for x in xs])
    means = torch.stack([feats[[i for i, y in enumerate(ys) if y == c]].mean(0) for c in task.classes])
    means = F.normalize(means, dim=-1)
    fisher = {k: torch.zeros_like(w) for k, w in weights.items()}
    for x, y in zip(xs, ys):
        logits = scale * F.normalize(feature(x), dim=-1) @ means.T
        loss = F.cross_entropy(logits[None], torch.tensor([task.classes.index(y)]))
        for k, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            fisher[k] += g.pow(2)
    return {k: (f / len(xs)).detach().contiguous() for k, f in fisher.items()}


def test_pm_fisher_from_data_equals_brute_force(foreign, tiny_model, tiny_tasks, tmp_path):
    from pmserve.tasks import load_tasks

    tasks = load_tasks(str(tiny_tasks))
    with_files = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny single-sample passes: threads only contend
    try:
        for k, (a, task) in enumerate(
            zip(foreign, tasks)
        ):  # every task has fewer samples than fisher_samples
            d = shutil.copytree(a, tmp_path / "files" / f"a{k}")
            save_file(_brute_force_fisher(tiny_model, a, task), str(d / "fisher.safetensors"))
            with_files.append(d)
    finally:
        torch.set_num_threads(threads)
    ref = merge_adapters(with_files, tmp_path / "ref", options=MergeOptions("pm"), **QUIET)
    ident = merge_adapters(foreign, tmp_path / "id", options=MergeOptions("pm"), **QUIET)
    got = merge_adapters(
        foreign,
        tmp_path / "m-data",
        # the brute force's labels, and its Fisher as it is (the profile's scale is the next test's)
        options=MergeOptions("pm", data=str(tiny_tasks), fisher_labels="true", curvature="fisher"),
        **QUIET,
    )
    assert ref["fisher"] == "files" and ident["fisher"] == "identity" and got["fisher"] == "data"
    assert [i["fisher"] for i in got["inputs"]] == ["data"] * 3
    assert any("--data" in n for n in got["notes"]) and any("identity" in n for n in ident["notes"])
    assert got["alphas"] == pytest.approx(ref["alphas"], rel=1e-4, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(got["alphas"], ident["alphas"])) > 1e-2
    saved = json.loads((tmp_path / "m-data" / "merge_report.json").read_text())
    assert saved["fisher"] == "data" and saved["options"]["data"] == str(tiny_tasks)
    sampled = merge_adapters(  # the default: labels drawn from the model, as `pmserve train` takes them
        foreign, tmp_path / "m-sampled", options=MergeOptions("pm", data=str(tiny_tasks)), **QUIET
    )
    assert sampled["options"]["fisher_labels"] == "sampled"
    assert max(abs(a - b) for a, b in zip(sampled["alphas"], ref["alphas"])) > 1e-3
    # mixed: files where present, --data for the rest
    mixed = merge_adapters(
        [with_files[0], foreign[1], with_files[2]],
        tmp_path / "mixed",
        options=MergeOptions("pm", data=str(tiny_tasks), fisher_labels="true", curvature="fisher"),
        **QUIET,
    )
    assert mixed["fisher"] == "files+data" and [i["fisher"] for i in mixed["inputs"]] == [
        "files",
        "data",
        "files",
    ]
    assert mixed["alphas"] == pytest.approx(ref["alphas"], rel=1e-4, abs=1e-6)
    with pytest.raises(PMError, match="2 tasks for 3 adapters"):
        two = write_tasks(tmp_path / "two", [["animal", "food"], ["tool", "place"]])
        merge_adapters(foreign, tmp_path / "x", options=MergeOptions("pm", data=str(two)), **QUIET)
    with pytest.raises(PMError, match="--data: only pm"):
        merge_adapters(foreign, tmp_path / "y", options=MergeOptions("avg", data=str(tiny_tasks)), **QUIET)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_pm_with_fisher_files_on_independent_adapters_matches_merge_py(foreign, tmp_path):
    """The one-pass Gram-matrix closed form against the recurrence's full-tensor formulas (what training runs)."""
    from pmserve.merging.recurrence import FisherSums, alpha_terms, closed_form_alpha

    deltas = [_deltas(foreign[0], 1.0), _deltas(foreign[1], 2.0), _deltas(foreign[2], 1.0)]
    g = torch.Generator().manual_seed(0)
    fishers = [{k: torch.rand(d.shape, generator=g) ** 4 for k, d in ds.items()} for ds in deltas]
    folders = []
    for k, (a, f) in enumerate(zip(foreign, fishers)):
        folders.append(shutil.copytree(a, tmp_path / f"a{k}"))
        save_file(f, str(folders[-1] / "fisher.safetensors"))
    for clip in (True, False):
        rep = merge_adapters(folders, tmp_path / f"o{clip}", options=MergeOptions("pm", clip=clip), **QUIET)
        merged, sums, want = {}, FisherSums(), []
        for t, (ds, f) in enumerate(zip(deltas, fishers)):
            sums.add(f, ds)  # independent: theta*_t - W_0 = Delta_t
            step = {k: d - merged[k] for k, d in ds.items()} if merged else ds
            terms = [
                alpha_terms(merged.get(k, 0 * d), step[k], sums.S_F[k], sums.S_Ft[k]) for k, d in ds.items()
            ]
            want.append(1.0 if t == 0 else closed_form_alpha(terms, clip=clip))
            merged = {k: merged.get(k, 0) + want[-1] * step[k] for k in ds}
        assert rep["fisher"] == "files" and rep["alphas"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        got = load_file(str(tmp_path / f"o{clip}" / "merged.safetensors"))
        for k in merged:
            torch.testing.assert_close(got[k], merged[k], rtol=1e-5, atol=1e-6)


def test_bf16_sharded_base_full_and_independent_adapter(foreign, tiny_model, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "bf16"
    m = _auto_model(tiny_model).to(torch.bfloat16)
    m.save_pretrained(str(base_dir), max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, base_dir / f)
    assert (base_dir / "model.safetensors.index.json").is_file()
    out = tmp_path / "full"
    merge_adapters(foreign, out, base=str(base_dir), options=MergeOptions("avg", "full"), **QUIET)
    full, base = _weights(_auto_model(out)), _weights(m)
    deltas = [_deltas(foreign[0], 1.0), _deltas(foreign[1], 2.0), _deltas(foreign[2], 1.0)]
    for k, w in base.items():
        assert full[k].dtype == torch.bfloat16
        mod = k[: -len(".weight")]
        want = (w.float() + sum(d[mod] for d in deltas) / 3).to(torch.bfloat16) if mod in deltas[0] else w
        torch.testing.assert_close(full[k], want, rtol=0, atol=0.02)
    # an adapter of the same merge, on the bf16 base, is the same model
    merge_adapters(
        foreign, tmp_path / "ad", base=str(base_dir), options=MergeOptions("avg", "adapter"), **QUIET
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(
            _auto_model(base_dir).float(), str(tmp_path / "ad")
        ).merge_and_unload()
    got = _weights(merged)
    for mod in deltas[0]:
        want = base[mod + ".weight"].float() + sum(d[mod] for d in deltas) / 3
        torch.testing.assert_close(got[mod + ".weight"], want, rtol=0, atol=1e-5)


def _corrupt(case: str, pm_run: Path, foreign: list[Path], tiny_model: Path, root: Path):
    """(inputs, base, options, words the one-line error must contain)."""
    run = root / "run"
    shutil.copytree(pm_run, run)
    t1 = sorted((run / "tasks").iterdir())[1]
    opts = MergeOptions("pm", "delta")
    if case == "fingerprint":
        meta = json.loads((t1 / "pmserve_adapter.json").read_text())
        (t1 / "pmserve_adapter.json").write_text(json.dumps({**meta, "base_fingerprint": "0123456789abcdef"}))
        return [run], None, opts, [str(t1 / "pmserve_adapter.json"), "another base model"]
    if case == "targets":
        other = _foreign(tiny_model, root / "q", 5, 2, 2.0, targets=("query", "value"))
        return (
            [foreign[0], other],
            str(tiny_model),
            opts,
            [str(other / "adapter_model.safetensors"), "target modules"],
        )
    if case == "truncated":
        f = t1 / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-40])
        return [run], None, opts, [str(f), "not a readable safetensors"]
    if case == "bad_json":
        (t1 / "adapter_config.json").write_text("{oops")
        return [run], None, opts, [str(t1 / "adapter_config.json"), "bad JSON"]
    if case == "missing_fisher_file":
        (t1 / "adapter_model.safetensors").unlink()
        return [run], None, opts, [str(t1 / "adapter_model.safetensors"), "missing"]
    if case in ("nan_factor", "inf_fisher"):
        name = "adapter_model.safetensors" if case == "nan_factor" else "fisher.safetensors"
        t = load_file(str(t1 / name))
        k = sorted(t)[-1]
        t[k][0, 0] = float("nan") if case == "nan_factor" else float("inf")
        save_file(t, str(t1 / name))
        return [run], None, opts, [str(t1 / name), "NaN or Inf"]
    if case == "shape":
        f = t1 / "adapter_model.safetensors"
        t = load_file(str(f))
        t = {k: (v[:, :16].contiguous() if ".lora_A." in k else v) for k, v in t.items()}
        save_file(t, str(f))
        return [run], None, opts, [str(f), "the base's"]
    if case == "ties_adapter":
        return foreign, str(tiny_model), MergeOptions("ties", "adapter"), ["--format adapter", "ties"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "fingerprint",
        "targets",
        "truncated",
        "bad_json",
        "missing_fisher_file",
        "nan_factor",
        "inf_fisher",
        "shape",
        "ties_adapter",
    ],
)
def test_bad_inputs_one_error_no_out(case, pm_run, foreign, tiny_model, tmp_path):
    inputs, base, opts, needles = _corrupt(case, pm_run, foreign, tiny_model, tmp_path / "in")
    out = tmp_path / "out" / "merged"
    with pytest.raises(PMError) as e:
        merge_adapters(inputs, out, base=base, options=opts, **QUIET)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert (
        not out.exists() and not list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else True
    )


def test_interrupted_write_leaves_nothing(foreign, tiny_model, tmp_path, monkeypatch):
    import pmserve.merging.write as mf

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mf, "write_classifier", boom)
    with pytest.raises(KeyboardInterrupt):
        merge_adapters(foreign, tmp_path / "o", base=str(tiny_model), options=MergeOptions("avg"), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_writer_streams_a_readable_file(tmp_path):
    from safetensors import safe_open

    ts = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.tensor(7, dtype=torch.int64),
    }
    w = SafetensorsWriter(tmp_path, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], stem="x")
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v)


def test_cli_merge(pm_run, tmp_path):
    from pmserve.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(pm_run), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "alphas 1" in res.output and (tmp_path / "o" / "merged.safetensors").is_file()
    bad = runner.invoke(app, ["merge", str(pm_run), "--out", str(tmp_path / "p"), "--method", "magic"])
    assert bad.exit_code == 2 and "pmserve: error: --method" in bad.output
    assert not (tmp_path / "p").exists()


def test_classifier_statistics_add_like_pooled_data():
    """Classifiers built on parts of the data (same backbone) combine into the classifier of the pooled data."""
    from pmserve.heads import LabelHead, Prototypes, Ridge
    from pmserve.merging.classifier import combine

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g)
    labels = [["a", "b", "c"][i % 3] if i < 40 else ["c", "d"][i % 2] for i in range(60)]
    parts = [(0, 25), (25, 40), (40, 60)]  # "c" is in every part, "d" only in the last
    for make in (lambda: Prototypes(8), lambda: Ridge(8, size=16, seed=3, lam=0.5)):
        pooled = make()
        pooled.update(feats, labels)
        pieces = []
        for lo, hi in parts:
            pieces.append(make())
            pieces[-1].update(feats[lo:hi], labels[lo:hi])
        got = combine(pieces)
        assert sorted(got.labels) == sorted(pooled.labels)
        torch.testing.assert_close(
            got.scores(feats)[:, [got.labels.index(y) for y in pooled.labels]], pooled.scores(feats)
        )
    heads = [LabelHead(8), LabelHead(8)]
    heads[0].add_labels(["a", "b"], g)
    heads[1].add_labels(["b", "c"], g)
    got = combine(heads)
    assert got.labels == ["a", "b", "c"]
    torch.testing.assert_close(got.weight[1:], heads[1].weight)  # "b": the later head's row
    torch.testing.assert_close(got.weight[0], heads[0].weight[0])


def test_merge_carries_the_run_classifier_and_calibrates_one(pm_run, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from pmserve.heads import load_scorer

    data = pm_run.parent / "data"
    rep = merge_adapters([pm_run], tmp_path / "carried", options=MergeOptions("pm", "full"), **QUIET)
    assert rep["classifier"]["source"] == "carried" and rep["classifier"]["approximate"]
    carried, run_clf = load_scorer(tmp_path / "carried"), load_scorer(pm_run / "state")
    assert carried.labels == run_clf.labels
    torch.testing.assert_close(carried.sums, run_clf.sums)

    out = tmp_path / "calibrated"
    rep = merge_adapters([pm_run], out, options=MergeOptions("pm", "full", calibrate=str(data)), **QUIET)
    assert rep["classifier"]["source"] == "calibrated" and not rep["classifier"]["approximate"]
    # reference: the written HF model itself, mean-pooled features, class sums
    model, tok = _auto_model(out), AutoTokenizer.from_pretrained(str(out))
    want: dict[str, torch.Tensor] = {}
    for task in sorted(data.iterdir()):
        for line in (task / "train.jsonl").read_text().splitlines():
            row = json.loads(line)
            enc = tok([row["text"]], return_tensors="pt")
            with torch.no_grad():
                h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            want[row["label"]] = want.get(row["label"], 0) + h[0].mean(0).double()
    got = load_scorer(out)
    assert set(got.labels) == set(want) and got.counts.tolist() == [12.0] * 6
    for i, y in enumerate(got.labels):
        torch.testing.assert_close(got.sums[i], want[y], rtol=1e-4, atol=1e-4)
    ridge = merge_adapters(
        [pm_run],
        tmp_path / "ridge",
        options=MergeOptions("pm", "delta", calibrate=str(data), calibrate_head="ridge"),
        **QUIET,
    )
    assert ridge["classifier"]["kind"] == "ridge" and ridge["classifier"]["lambda"] > 0
    with pytest.raises(PMError, match="--calibrate-head: only with --calibrate"):
        merge_adapters([pm_run], tmp_path / "x", options=MergeOptions("pm", calibrate_head="ridge"), **QUIET)
    two = write_tasks(tmp_path / "two", [["animal", "food"], ["tool", "place"]])
    with pytest.raises(PMError, match="--calibrate: .* no task with label 'feeling'"):
        merge_adapters([pm_run], tmp_path / "y", options=MergeOptions("pm", calibrate=str(two)), **QUIET)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------- pm's clip at both edges, through the files


def _full_rank_adapter(tiny_model: Path, folder: Path, seed: int, deltas: dict[str, torch.Tensor]) -> Path:
    """A PEFT LoRA on `value` whose Delta is exactly `deltas`: rank = width, A = I, B = Delta, scaling 1."""
    width = next(iter(deltas.values())).shape[1]
    _foreign(tiny_model, folder, seed, width, float(width), targets=("value",))
    t = load_file(str(folder / "adapter_model.safetensors"))
    new = {}
    for k in t:
        m = k[len("base_model.model.") :].rsplit(".lora_", 1)[0]
        new[k] = torch.eye(width) if ".lora_A." in k else deltas[m].float().contiguous()
    assert {k[len("base_model.model.") :].rsplit(".lora_", 1)[0] for k in t} == set(deltas)
    save_file(new, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("edge", ["low", "high"])
def test_offline_pm_clip_reaches_both_edges(tiny_model, tmp_path, edge):
    """Independent adapters with Fisher files whose unclipped alpha_3 is < 0 or > 1: --no-clip reports the
    brute-force minimiser, the default clip exactly 0.0 or 1.0 (and the merge is then D_2 or Delta_3)."""
    from tests.test_merge import brute_force_alpha, clip_edge_case

    modules = [f"encoder.layer.{i}.attention.self.value" for i in (0, 1)]
    fishers, deltas, a2, _, _, want = clip_edge_case(edge, {m: (32, 32) for m in modules}, seed=1)
    folders = []
    for i, (f, d) in enumerate(zip(fishers, deltas)):
        folders.append(_full_rank_adapter(tiny_model, tmp_path / f"a{i}", i, d))
        save_file({m: f[m].float().contiguous() for m in modules}, str(folders[-1] / "fisher.safetensors"))
    # what pmserve reads: float32 tensors
    fishers = [{m: f[m].float().double() for m in modules} for f in fishers]
    deltas = [{m: d[m].float().double() for m in modules} for d in deltas]

    raw = merge_adapters(folders, tmp_path / "raw", options=MergeOptions("pm", clip=False), **QUIET)
    clipped = merge_adapters(folders, tmp_path / "clipped", options=MergeOptions("pm", clip=True), **QUIET)
    assert raw["fisher"] == clipped["fisher"] == "files" and (raw["clip"], clipped["clip"]) == (False, True)
    assert raw["alphas"][:2] == pytest.approx([1.0, a2], abs=1e-6)
    assert clipped["alphas"][:2] == raw["alphas"][:2]
    a2 = raw["alphas"][1]
    d2 = {m: deltas[0][m] + a2 * (deltas[1][m] - deltas[0][m]) for m in modules}
    step = {m: deltas[2][m] - d2[m] for m in modules}  # independent: theta*_3 - W_hat_2
    best = brute_force_alpha(d2, step, fishers, deltas)
    a3 = raw["alphas"][2]
    assert (a3 < -0.05) if edge == "low" else (a3 > 1.05)
    assert a3 == pytest.approx(best, abs=1e-4) and a3 == pytest.approx(want, abs=1e-4)
    assert clipped["alphas"][2] == (0.0 if edge == "low" else 1.0)  # exactly the edge
    got = {n: load_file(str(tmp_path / n / "merged.safetensors")) for n in ("raw", "clipped")}
    for m in modules:
        want_raw = d2[m] + a3 * step[m]
        want_clipped = d2[m] if edge == "low" else deltas[2][m]
        torch.testing.assert_close(got["raw"][m].double(), want_raw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["clipped"][m].double(), want_clipped, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fan_in_fan_out (GPT-2's Conv1D) against PEFT

FIFO_METHODS = {  # method: (MergeOptions keywords, PEFT's combination over the deltas)
    "avg": ({}, "cat", [1 / 3, 1 / 3, 1 / 3]),
    "linear": ({"weights": [1.0, 2.0, 1.0]}, "cat", [0.25, 0.5, 0.25]),
    "task-arithmetic": ({"weights": [0.5, 1.0, -0.25]}, "cat", [0.5, 1.0, -0.25]),
    "ties": ({"weights": [1.0, 0.5, 1.0], "density": 0.4}, "ties_svd", [1.0, 0.5, 1.0]),
}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (Conv1D c_attn, c_proj, c_fc: weights stored [in, out]) and three PEFT LoRAs on c_attn and
    c_proj with fan_in_fan_out=True, random nonzero A and B, different ranks and scalings."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    GPT2Model(cfg).save_pretrained(str(root / "base"))
    adapters = []
    for i, (r, alpha) in enumerate([(2, 4.0), (3, 3.0), (4, 16.0)]):
        torch.manual_seed(10 + i)
        lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(GPT2Model.from_pretrained(str(root / "base")), lora)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, 0.0, 0.5)
        model.save_pretrained(str(root / f"a{i}"))
        adapters.append(root / f"a{i}")
    return root / "base", adapters


def _peft_gpt2(base: Path, adapters: list[Path]):
    """PEFT's own view: the three adapters loaded into one PeftModel as t0, t1, t2."""
    from peft import PeftModel
    from transformers import GPT2Model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            GPT2Model.from_pretrained(str(base)), str(adapters[0]), adapter_name="t0"
        )
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(str(a), adapter_name=f"t{i}")
    return model.eval()


def test_fan_in_fan_out_adapters_merge_like_peft(gpt2, tmp_path):
    """Conv1D LoRAs (fan_in_fan_out) merged by avg, linear, task-arithmetic and ties: the delta output equals
    PEFT's get_delta_weight combined by peft's merge_utils, and the full output equals the model PEFT builds with
    add_weighted_adapter (cat / ties_svd at full rank) and merge_and_unload."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import merge_utils as mu
    from transformers import GPT2Model

    base, adapters = gpt2
    peft_model = _peft_gpt2(base, adapters)
    layers = {
        n[len("base_model.model.") :]: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert len(layers) == 6  # c_attn, attn.c_proj and mlp.c_proj of both layers
    assert all(m.fan_in_fan_out for m in layers.values())
    base_w = _weights(GPT2Model.from_pretrained(str(base)))
    with torch.no_grad():
        deltas = {k: [m.get_delta_weight(f"t{i}") for i in range(3)] for k, m in layers.items()}
    for k, ds in deltas.items():  # PEFT's deltas are in the Conv1D layout [in, out], and not square here
        assert all(d.shape == base_w[k + ".weight"].shape and d.abs().max() > 0 for d in ds)
    assert any(d[0].shape[0] != d[0].shape[1] for d in deltas.values())

    for method, (kw, combination, weights) in FIFO_METHODS.items():
        merge_adapters(adapters, tmp_path / method, options=MergeOptions(method, "delta", **kw), **QUIET)
        got = load_file(str(tmp_path / method / "merged.safetensors"))
        assert got.keys() == deltas.keys(), method
        w = torch.tensor(weights)
        for k, ds in deltas.items():
            want = mu.ties(ds, w, 0.4) if method == "ties" else mu.task_arithmetic(ds, w)
            what = f"{method} {k}"
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"{w}: {m}")

        # the full model against PEFT's add_weighted_adapter + merge_and_unload
        full = tmp_path / f"{method}-full"
        merge_adapters(adapters, full, base=str(base), options=MergeOptions(method, "full", **kw), **QUIET)
        ours = _weights(GPT2Model.from_pretrained(str(full)))
        ref = _peft_gpt2(base, adapters)
        extra = {"density": 0.4, "svd_rank": 16} if combination == "ties_svd" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.add_weighted_adapter(
                ["t0", "t1", "t2"], weights, "merged", combination_type=combination, **extra
            )
            ref.set_adapter("merged")
            theirs = _weights(ref.merge_and_unload())
        assert ours.keys() == theirs.keys() == base_w.keys()
        for k, v in theirs.items():
            what = f"{method} full {k}"
            torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")
            if k[: -len(".weight")] not in deltas:
                assert torch.equal(ours[k], base_w[k]), k


def _brute_force_profile(tiny_model: Path, adapter: Path, task, points, scale: float = 16.0) -> list[float]:
    """Task loss at W_0 + s Delta by other means: plain PEFT with each LoRA scaling times s, one sample at a time,
    cosine logits to the class means of the features at s = 1 (the adapter's own optimum)."""
    import torch.nn.functional as F
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_auto_model(tiny_model), str(adapter)).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    base = [m.scaling["default"] for m in layers]

    @torch.no_grad()
    def features(s):
        for m, b in zip(layers, base):
            m.scaling["default"] = b * s
        out = []
        for x in task.train.inputs:
            enc = tok([x], return_tensors="pt")
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * mask).sum(1) / mask.sum(1))[0])
        return torch.stack(out)

    ys = torch.tensor([task.classes.index(y) for y in task.train.labels])
    at_optimum = features(1.0)
    means = torch.stack([at_optimum[ys == c].mean(0) for c in range(len(task.classes))])
    means = F.normalize(means, dim=-1)
    return [float(F.cross_entropy(scale * F.normalize(features(s), dim=-1) @ means.T, ys)) for s in points]


def test_pm_data_fisher_scaled_to_the_loss_profile_equals_brute_force(
    foreign, tiny_model, tiny_tasks, tmp_path
):
    """--curvature profile (the default): each --data Fisher scaled so that its quadratic form along the adapter's
    own Delta is the least-squares curvature of the task's loss at W_0 + s Delta, all recomputed by plain PEFT."""
    from pmserve.adapters import lora_delta
    from pmserve.merging.curvature import PROFILE_POINTS, profile_curvature, rescale
    from pmserve.tasks import load_tasks

    tasks = load_tasks(str(tiny_tasks))
    with_files = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k, (a, task) in enumerate(zip(foreign, tasks)):
            lora = load_file(str(a / "adapter_model.safetensors"))
            cfg = json.loads((a / "adapter_config.json").read_text())
            fisher = _brute_force_fisher(tiny_model, a, task)
            pre, sc = "base_model.model.", cfg["lora_alpha"] / cfg["r"]
            delta = {
                m: lora_delta(lora[f"{pre}{m}.lora_A.weight"], lora[f"{pre}{m}.lora_B.weight"], sc)
                for m in fisher
            }
            c = profile_curvature(PROFILE_POINTS, _brute_force_profile(tiny_model, a, task, PROFILE_POINTS))
            assert c > 0
            d = shutil.copytree(a, tmp_path / "files" / f"a{k}")
            scaled = {m: f.contiguous() for m, f in rescale(fisher, delta, c)[0].items()}
            save_file(scaled, str(d / "fisher.safetensors"))
            with_files.append(d)
    finally:
        torch.set_num_threads(threads)
    ref = merge_adapters(with_files, tmp_path / "ref", options=MergeOptions("pm"), **QUIET)
    got = merge_adapters(
        foreign,
        tmp_path / "got",
        options=MergeOptions("pm", data=str(tiny_tasks), fisher_labels="true"),
        **QUIET,
    )
    paper = merge_adapters(
        foreign,
        tmp_path / "paper",
        options=MergeOptions("pm", data=str(tiny_tasks), fisher_labels="true", curvature="fisher"),
        **QUIET,
    )
    assert got["options"]["curvature"] == "profile"
    # these adapters move their tasks' loss by about 1e-4, so fp32 rounding of the loss differences leaves the
    # curvature good to about 1e-3 (PEFT one sample at a time against pmserve's padded batches, both float32)
    assert got["alphas"] == pytest.approx(ref["alphas"], rel=3e-3)
    assert max(abs(a - b) for a, b in zip(got["alphas"], paper["alphas"])) > 0.05
