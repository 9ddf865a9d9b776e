"""Model cards: the facts of the folder appear, PEFT's placeholders do not, and the loading code runs."""

import re

import pytest

from pmserve.model_card import merged_card, task_card

CONFIG = {
    "data": "builtin:wordnet-nouns",
    "model": "builtin:minilm",
    "method": "pm",
    "head": "ridge",
    "train_head": "linear",
    "rank": 10,
    "lora_alpha": 10.0,
    "target_modules": ["all-linear"],
    "eps": 0.5,
    "perturb_per": "step",
    "seed": 0,
}
TASKS = ["task0", "task1", "task2"]


def _task(index, **kw):
    return {
        "index": index,
        "name": TASKS[index],
        "method": "pm",
        "labels": [f"noun.l{index}a", f"noun.l{index}b"],
        "alpha": 0.4321,
        "ridge_lambda": 1.0,
        "seconds": 12.0,
        "acc": {"ridge": [0.811, 0.822, 0.933][: index + 1], "linear": [0.5, 0.6, 0.7][: index + 1]},
        **kw,
    }


def _report(fmt="delta", **kw):
    return {
        "method": "pm",
        "format": fmt,
        "alphas": [1.0, 0.25],
        "weights": None,
        "coefficients": [0.75, 0.25],
        "fisher": "files",
        "clip": True,
        "density": None,
        "seed": None,
        "base": {"model": "builtin:minilm", "path": "/models/minilm", "fingerprint": "f"},
        "inputs": [
            {"path": "/runs/pm/tasks/00-task0", "name": "00-task0", "task": 0},
            {"path": "/runs/pm/tasks/01-task1", "name": "01-task1", "task": 1},
        ],
        "labels": ["noun.animal", "noun.food"],
        "classifier": {"source": "carried", "approximate": True, "note": "carried over", "kind": "ridge"},
        "notes": ["a note from the merge"],
        "outputs": ["merged.safetensors"],
        **kw,
    }


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:40]
    head = card.split("---\n")[1]
    fields = dict(re.findall(r"^(\w+): (.*)$", head, re.M))
    fields["tags"] = re.findall(r"^- (.*)$", head, re.M)
    return fields


def test_task_card_fields():
    card = task_card(_task(2), CONFIG, TASKS, base_path="/models/minilm", folder="runs/pm/tasks/02-task2")
    fm = front_matter(card)
    assert fm["library_name"] == "peft"
    assert fm["base_model"] == '"sentence-transformers/all-MiniLM-L6-v2"'
    assert fm["tags"] == ["pmserve", "lora", "continual-learning"]
    for needle in (
        "builtin:minilm",
        "/models/minilm",
        "task 2 (task2)",
        "noun.l2a",
        "noun.l2b",
        "`pm`",
        "0.4321",
        "0.811",
        "0.933",
        "builtin:wordnet-nouns",
        "rank 10",
        "chained",
        "pmserve merge runs/pm/tasks/00-task0 runs/pm/tasks/01-task1 --format delta --out after-task1",
        "after-task1/merged.safetensors",
        "PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), FOLDER)",
        "pmserve merge",
    ):
        assert needle in card, needle
    assert "[More Information Needed]" not in card


def test_first_task_loads_directly():
    card = task_card(_task(0), CONFIG, TASKS)
    assert "first task" in card and "**chained**" not in card
    assert "model = PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), FOLDER)" in card
    assert "[More Information Needed]" not in card


@pytest.mark.parametrize(
    "fmt, library", [("delta", "transformers"), ("adapter", "peft"), ("full", "transformers")]
)
def test_merged_card_fields(fmt, library):
    card = merged_card(_report(fmt), folder="merged/pm")
    fm = front_matter(card)
    assert fm["library_name"] == library
    assert fm["base_model"] == '"sentence-transformers/all-MiniLM-L6-v2"'
    assert fm["tags"] == ["pmserve", "lora", "continual-learning"]
    for needle in (
        "`pm`",
        f"`{fmt}`",
        "/runs/pm/tasks/00-task0",
        "0.25",
        "0.75",
        "noun.animal",
        "a note from",
    ):
        assert needle in card, needle
    loader = {
        "full": 'AutoModel.from_pretrained("merged/pm")',
        "adapter": 'PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), "merged/pm")',
        "delta": "merged/pm/merged.safetensors",
    }[fmt]
    assert loader in card
    assert "[More Information Needed]" not in card


def test_merged_card_weights_of_linear_methods():
    card = merged_card(
        _report(method="ties", alphas=None, weights=[0.3, 0.7], coefficients=None, density=0.5)
    )
    assert "| weight |" in card and "alpha" not in card.split("## Inputs")[1].split("\n")[2]
    assert "0.3" in card and "0.7" in card and "density" in card


def _code(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_loading_code_runs(tiny_model, tmp_path, monkeypatch):
    """The cards' Python loads what the card describes: W_0 + previous merged delta + this adapter, W_0 + delta,
    the merged adapter and the full folder."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel

    module = "encoder.layer.0.attention.self.query"
    w0 = AutoModel.from_pretrained(tiny_model).get_submodule(module).weight.detach().clone()
    delta = torch.randn_like(w0)
    run = tmp_path / "run"
    prev, here = tmp_path / "after-task0", run / "tasks" / "01-task1"  # what the card's merge command writes
    prev.mkdir(parents=True)
    save_file({module: delta}, str(prev / "merged.safetensors"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    peft = get_peft_model(AutoModel.from_pretrained(tiny_model), LoraConfig(r=2, target_modules=["query"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    peft.save_pretrained(here)
    config = {**CONFIG, "model": str(tiny_model)}

    scope: dict = {}
    exec(_code(task_card(_task(1), config, TASKS, folder=str(here))), scope)
    model = scope["model"]
    assert isinstance(model, PeftModel)
    base = model.get_base_model().get_submodule(module).base_layer.weight
    assert torch.allclose(base, w0 + delta)

    out = tmp_path / "merged"
    out.mkdir()
    save_file({module: delta}, str(out / "merged.safetensors"))
    report = _report("delta", base={"model": str(tiny_model), "path": str(tiny_model)})
    scope = {}
    exec(_code(merged_card(report, folder=str(out))), scope)
    assert torch.allclose(scope["model"].get_submodule(module).weight, w0 + delta)

    scope = {}
    exec(_code(merged_card(_report("adapter", base=report["base"]), folder=str(here))), scope)
    assert not isinstance(scope["model"], PeftModel)  # merged and unloaded

    full = tmp_path / "full"
    AutoModel.from_pretrained(tiny_model).save_pretrained(full)
    scope = {}
    exec(_code(merged_card(_report("full"), folder=str(full))), scope)
    assert torch.allclose(scope["model"].get_submodule(module).weight, w0)
