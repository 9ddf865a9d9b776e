"""End-to-end runs on a tiny model: files, PEFT loading, accuracy reproduction, and resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmserve.errors import PMError
from pmserve.train import TrainConfig, train


def config(data, model, **kw):
    base = dict(
        data=str(data),
        model=str(model),
        epochs=6,
        batch_size=8,
        rank=2,
        fisher_samples=16,
        seed=1,
        lr=3e-2,
        head="linear",
        ridge_dim=64,
        head_lr=5e-2,
    )
    return TrainConfig(**{**base, **kw})


def load_backbone(model_dir, merged=None):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    if merged:
        mods = dict(m.named_modules())
        with torch.no_grad():
            for k, d in merged.items():
                mods[k].weight += d
    return m


def pooled(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)


def test_pm_run_files_and_metrics(tiny_model, tiny_tasks, tmp_path):
    out = tmp_path / "run"
    r = train(config(tiny_tasks, tiny_model), out, progress=False, log=lambda *_: None)
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "pm" and m["tasks"] == ["t0", "t1", "t2"]
    assert [len(row) for row in m["acc_matrix"]] == [1, 2, 3]
    assert m["alphas"][0] == 1.0 and all(0.0 <= a <= 1.0 for a in m["alphas"])
    assert m["ACC"] == pytest.approx(sum(m["acc_matrix"][-1]) / 3)
    assert m["acc_matrix"][0][0] > 0.75  # the tiny tasks are learnable
    for k in ("AAA", "forgetting", "seconds"):
        assert k in m
    assert json.loads((out / "config.json").read_text())["method"] == "pm"
    folders = sorted(p.name for p in (out / "tasks").iterdir())
    assert folders == ["00-t0", "01-t1", "02-t2"]
    assert r["ACC"] == m["ACC"]


def test_adapter_loads_with_plain_peft_and_merged_state_reproduces_accuracy(tiny_model, tiny_tasks, tmp_path):
    """The RUN keeps adapters, alphas and one state: W_hat_1, rebuilt by `pmserve merge` of tasks 0 and 1 with
    the RUN's recorded alphas (what task 2's card says to run), under plain PEFT with task 2's adapter equals
    W_hat_1 + Delta_2 by hand; the state's merged weights and head give the run's reported accuracy."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pmserve.adapters import lora_delta
    from pmserve.merging import MergeOptions, merge_adapters

    out = tmp_path / "run"
    m = train(config(tiny_tasks, tiny_model, method="merge"), out, progress=False, log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    texts = ["dog the cat", "hammer a saw", "joy of love"]
    t0, t1, t2 = out / "tasks" / "00-t0", out / "tasks" / "01-t1", out / "tasks" / "02-t2"
    report = merge_adapters(
        [t0, t1], tmp_path / "after-task1", options=MergeOptions(format="delta"), log=print
    )
    assert report["alphas"] == m["alphas"][:2]
    w1 = load_file(str(tmp_path / "after-task1" / "merged.safetensors"))
    # task 2's adapter was trained on the merged model after task 1: plain PEFT on that model ...
    peft = PeftModel.from_pretrained(load_backbone(tiny_model, w1), str(t2))
    # ... equals W_hat_1 + Delta_2 written by hand
    lora = load_file(str(t2 / "adapter_model.safetensors"))
    scaling = json.loads((t2 / "adapter_config.json").read_text())["lora_alpha"] / 2
    delta2 = {
        k: lora_delta(
            lora[f"base_model.model.{k}.lora_A.weight"], lora[f"base_model.model.{k}.lora_B.weight"], scaling
        )
        for k in w1
    }
    by_hand = load_backbone(tiny_model, {k: w1[k] + delta2[k] for k in w1})
    torch.testing.assert_close(pooled(peft, tok, texts), pooled(by_hand, tok, texts), rtol=1e-4, atol=1e-5)
    # the state's merged weights equal W_hat_1 + alpha_2 Delta_2 (the recurrence, chained)
    state = out / "state"
    final_delta = load_file(str(state / "merged.safetensors"))
    for k in w1:
        torch.testing.assert_close(final_delta[k], w1[k] + m["alphas"][2] * delta2[k], rtol=1e-4, atol=1e-6)
    # the final merged model + the concatenated heads give the run's reported accuracy
    final = load_backbone(tiny_model, final_delta)
    head = load_file(str(state / "head.safetensors"))
    labels = json.loads((state / "classifier.json").read_text())["labels"]
    for j, name in enumerate(["t0", "t1", "t2"]):
        rows = [json.loads(x) for x in (tiny_tasks / name / "test.jsonl").read_text().splitlines()]
        logits = pooled(final, tok, [r["text"] for r in rows]) @ head["weight"].T + head["bias"]
        acc = sum(labels[i] == r["label"] for i, r in zip(logits.argmax(1).tolist(), rows)) / len(rows)
        assert acc == pytest.approx(m["acc_matrix"][-1][j])


def killed_during(task_index: int, monkeypatch):
    """Make training die (as a kill would) when it starts task `task_index`."""
    from pmserve import train as train_module

    real = train_module.Learner.train_task

    def dying(self, task, i, *a, **kw):
        if i == task_index:
            raise KeyboardInterrupt
        return real(self, task, i, *a, **kw)

    monkeypatch.setattr(train_module.Learner, "train_task", dying)
    return lambda: monkeypatch.setattr(train_module.Learner, "train_task", real)


@pytest.mark.parametrize("head,extra", [("linear", ["prototype", "ridge"]), ("ridge", [])])
def test_resume_equals_uninterrupted(tiny_model, tiny_tasks, tmp_path, monkeypatch, head, extra):
    def cfg(**kw):
        return config(
            tiny_tasks, tiny_model, head=head, ridge_dim=64, ridge_drift="linear", eval_heads=extra, **kw
        )

    full = train(cfg(), tmp_path / "full", progress=False, log=lambda *_: None)
    part = tmp_path / "part"
    undo = killed_during(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), part, progress=False)
    undo()
    (part / "tasks" / ".02-t2.tmp-999999").mkdir()  # a half-written task folder a killed process left
    assert [p.name for p in (part / "tasks").iterdir() if not p.name.startswith(".")] == ["00-t0", "01-t1"]
    with pytest.raises(PMError, match="rank is 2, this run.s is 5"):  # ranks differ: another run
        train(cfg(rank=5), part, True)
    old_cfg = json.loads((part / "config.json").read_text())
    assert old_cfg["fisher_labels"] == "sampled"
    old_cfg["fisher_labels"] = "true"
    (part / "config.json").write_text(json.dumps(old_cfg))
    with pytest.raises(PMError, match="fisher_labels is 'true', this run's is 'sampled'"):
        train(cfg(), part, True)
    del old_cfg["fisher_labels"]  # a run from before the option existed: it used true labels
    (part / "config.json").write_text(json.dumps(old_cfg))
    with pytest.raises(PMError, match="fisher_labels is 'true'"):
        train(cfg(), part, True)
    old_cfg["fisher_labels"] = "sampled"
    del old_cfg["ridge_drift"]  # a run from before --ridge-drift: its statistics stayed as computed (none)
    (part / "config.json").write_text(json.dumps(old_cfg))
    with pytest.raises(PMError, match="ridge_drift is 'none'"):
        train(cfg(), part, True)
    old_cfg["ridge_drift"] = "linear"
    (part / "config.json").write_text(json.dumps(old_cfg))
    resumed = train(cfg(), part, resume=True, progress=False, log=lambda *_: None)
    for k in ("acc_matrix", "alphas", "ACC", "AAA", "forgetting", "ridge_lambdas", "by_head"):
        assert resumed[k] == full[k], k
    for name in ("merged", "fisher_sums"):
        a = load_file(str(tmp_path / "full" / "state" / f"{name}.safetensors"))
        b = load_file(str(part / "state" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (part / "tasks").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["seq", "avg", "frozen", "joint"])
def test_other_methods(tiny_model, tiny_tasks, tmp_path, method):
    m = train(
        config(tiny_tasks, tiny_model, method=method, epochs=1, head="prototype"),
        tmp_path / method,
        progress=False,
        log=lambda *_: None,
    )
    if method == "joint":
        assert len(m["acc_matrix"]) == 1 and m["forgetting"] is None
    elif method == "frozen":
        assert m["alphas"] == [None, None, None]
        assert not list(Path(tmp_path / method).rglob("adapter_model.safetensors"))
    else:
        assert m["alphas"] == ([1.0, 1.0, 1.0] if method == "seq" else [1.0, 0.5, pytest.approx(1 / 3)])


def test_image_tasks_from_builtin_digits_and_files(tiny_vit, tmp_path):
    """The image path: built-in digits, and a folder of PNG files listed in a csv."""
    import numpy as np
    from PIL import Image

    m = train(
        config("builtin:digits:tasks=2,classes=2,train=12,test=6", tiny_vit, epochs=2),
        tmp_path / "digits",
        progress=False,
        log=lambda *_: None,
    )
    assert [len(r) for r in m["acc_matrix"]] == [1, 2]
    data = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for t, labels in enumerate([["dark", "light"], ["stripes", "dots"]]):
        d = data / f"t{t}"
        (d / "img").mkdir(parents=True)
        for split in ("train", "test"):
            lines = ["image,label"]
            for y in labels:
                for k in range(4):
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                        d / "img" / f"{split}-{y}-{k}.png"
                    )
                    lines.append(f"img/{split}-{y}-{k}.png,{y}")
            (d / f"{split}.csv").write_text("\n".join(lines) + "\n")
    m = train(
        config(data, tiny_vit, epochs=1, method="seq"),
        tmp_path / "files",
        progress=False,
        log=lambda *_: None,
    )
    assert m["tasks"] == ["t0", "t1"] and len(m["acc_matrix"][1]) == 2


def test_bucketed_batches_cover_every_sample_once_with_little_padding():
    from pmserve.learner import bucketed_batches

    lengths = [(i * 37) % 101 for i in range(250)]
    batches = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0))
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(250))
    spread = sum(max(lengths[i] for i in b.tolist()) - min(lengths[i] for i in b.tolist()) for b in batches)
    assert spread / len(batches) < 30  # random batches of 16 would spread over ~95
    again = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_target_modules_all_linear_is_peft_all_linear_without_the_pooler():
    """The default targets against PEFT's own "all-linear" on a BERT with a pooler (which pools nothing here:
    pmserve mean-pools), and "key-value" against the paper's choice."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from pmserve.learner import _adapted_names, resolve_targets

    def bert():
        torch.manual_seed(0)
        return BertModel(
            BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
        )

    peft = get_peft_model(bert(), LoraConfig(r=2, target_modules="all-linear"))
    ref = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert "pooler.dense" in ref
    ours = resolve_targets(bert(), ["all-linear"])
    assert set(_adapted_names(bert(), ours)) == ref - {"pooler.dense"}
    assert resolve_targets(bert(), []) == ours
    assert resolve_targets(bert(), ["key-value"]) == ["key", "value"]
    assert resolve_targets(bert(), ["query"]) == ["query"]
    # without a pooler the leaf names pick out exactly the blocks' layers
    no_pool = BertModel(bert().config, add_pooling_layer=False)
    assert resolve_targets(no_pool, ["all-linear"]) == ["query", "key", "value", "dense"]


def test_loss_profile_and_scaled_fisher_against_plain_transformers(tiny_model, tiny_tasks, tmp_path):
    """Task 1's recorded loss profile L(s) = its training loss at W_hat_0 + s Delta_1, recomputed with plain
    transformers from the adapters and the head; the kept Fisher is scaled so its quadratic form along Delta_1
    is the least-squares curvature of that profile."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from pmserve.adapters import lora_delta
    from pmserve.merging.curvature import profile_curvature, quadratic_form
    from pmserve.task_fisher import fisher_generator, fisher_order
    from pmserve.tasks import load_task_folder

    out = tmp_path / "run"
    cfg = config(tiny_tasks, tiny_model, keep_fisher=True)
    train(cfg, out, progress=False, log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))

    def delta(folder):
        lora = load_file(str(folder / "adapter_model.safetensors"))
        scaling = json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] / cfg.rank
        names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora}
        a, b = "base_model.model.{}.lora_A.weight", "base_model.model.{}.lora_B.weight"
        return {n: lora_delta(lora[a.format(n)], lora[b.format(n)], scaling) for n in names}

    t0, t1 = out / "tasks" / "00-t0", out / "tasks" / "01-t1"
    d0, d1 = delta(t0), delta(t1)  # alpha_1 = 1: W_hat_0 = W_0 + Delta_0
    info = json.loads((t1 / "task.json").read_text())
    prof = info["curvature"]
    head = load_file(str(out / "state" / "head.safetensors"))
    labels = json.loads((out / "state" / "head.json").read_text())["labels"]
    rows = [labels.index(y) for y in info["labels"]]
    split = load_task_folder(tiny_tasks / "t1").train
    order = fisher_order(split, cfg.fisher_samples, fisher_generator(cfg.seed, 1)).tolist()
    texts = [split.inputs[j] for j in order]
    ys = torch.tensor([info["labels"].index(split.labels[j]) for j in order])
    for s, recorded in zip(prof["points"], prof["losses"]):
        model = load_backbone(tiny_model, {k: d0[k] + s * d1[k] for k in d0})
        logits = pooled(model, tok, texts) @ head["weight"][rows].T + head["bias"][rows]
        assert recorded == pytest.approx(float(F.cross_entropy(logits, ys)), rel=1e-4, abs=1e-6)
    assert prof["curvature"] == pytest.approx(profile_curvature(prof["points"], prof["losses"]))
    assert prof["curvature"] > 0
    kept = load_file(str(t1 / "fisher.safetensors"))
    assert quadratic_form(kept, d1) == pytest.approx(prof["curvature"], rel=1e-4)
