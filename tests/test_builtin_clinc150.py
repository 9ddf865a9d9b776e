"""builtin:clinc150: the shipped CLINC150 copy (records, domains, attribution) and the task sequences drawn from
it (counts, grouping by domain, determinism by seed, options and their errors)."""

from __future__ import annotations

import fnmatch
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from pmserve.errors import PMError
from pmserve.tasks import (
    CLINC150_TEST,
    CLINC150_TRAIN,
    builtin_tasks,
    clinc150_domains,
    clinc150_records,
    load_tasks,
)

ROOT = Path(__file__).resolve().parents[1]


def _signature(tasks):
    return [(t.name, t.classes, t.train.inputs, t.train.labels, t.test.inputs, t.test.labels) for t in tasks]


def test_records_hold_the_full_data_set_with_domains():
    domains = clinc150_domains()
    assert len(domains) == 10 and all(len(v) == 15 for v in domains.values())
    assert {"banking", "credit_cards", "small_talk", "meta"} <= set(domains)
    domain_of = {i: d for d, intents in domains.items() for i in intents}
    assert len(domain_of) == 150
    for split, per_intent in (("train", 100), ("val", 20), ("test", 30)):
        records = clinc150_records(split)
        assert Counter(r.intent for r in records) == {i: per_intent for i in domain_of}, split
        assert all(r.domain == domain_of[r.intent] and r.text.strip() for r in records)
    for split, n in (("oos_train", 100), ("oos_val", 100), ("oos_test", 1000)):
        records = clinc150_records(split)
        assert len(records) == n and {(r.intent, r.domain) for r in records} == {("oos", None)}
    text, intent, domain = clinc150_records("train")[0]  # a plain (text, intent, domain) record
    assert isinstance(text, str) and domain == domain_of[intent]
    with pytest.raises(ValueError, match="one of train, val, test"):
        clinc150_records("validation")


def test_default_is_one_domain_per_task_with_the_default_counts():
    tasks = load_tasks("builtin:clinc150", seed=0)
    domains = clinc150_domains()
    assert len(tasks) == 10
    assert sorted(t.name for t in tasks) == sorted(domains)
    train_of = {}
    for r in clinc150_records("train"):
        train_of.setdefault(r.intent, set()).add(r.text)
    test_of = {}
    for r in clinc150_records("test"):
        test_of.setdefault(r.intent, set()).add(r.text)
    for t in tasks:
        assert t.kind == "text"
        assert sorted(t.classes) == sorted(domains[t.name])  # the task is its domain's 15 intents
        assert len(t.train.inputs) == len(t.train.labels) == 15 * CLINC150_TRAIN
        assert len(t.test.inputs) == len(t.test.labels) == 15 * CLINC150_TEST
        assert Counter(t.train.labels) == {i: CLINC150_TRAIN for i in t.classes}
        assert Counter(t.test.labels) == {i: CLINC150_TEST for i in t.classes}
        # each request comes from its own intent's split, and none is drawn twice
        assert all(x in train_of[y] for x, y in zip(t.train.inputs, t.train.labels))
        assert all(x in test_of[y] for x, y in zip(t.test.inputs, t.test.labels))
        assert len(set(t.train.inputs)) == len(t.train.inputs)


def test_the_seed_fixes_the_tasks_and_orders_the_domains():
    a, b = builtin_tasks("builtin:clinc150", seed=3), builtin_tasks("builtin:clinc150", seed=3)
    assert _signature(a) == _signature(b)
    other = builtin_tasks("builtin:clinc150", seed=4)
    assert [t.name for t in other] != [t.name for t in a]
    assert sorted(t.name for t in other) == sorted(t.name for t in a)

    def requests(tasks):
        return {y: x for t in tasks for x, y in zip(t.train.inputs, t.train.labels)}  # an intent's last

    mine, theirs = requests(a), requests(other)
    assert sum(mine[i] != theirs[i] for i in mine) > 100  # the same intent, other requests


def test_options_long_sequence_and_counts():
    long = builtin_tasks("builtin:clinc150:tasks=30,classes=5", seed=0)
    assert len(long) == 30 and all(len(t.classes) == 5 for t in long)
    assert len({i for t in long for i in t.classes}) == 150
    domain_of = {i: d for d, intents in clinc150_domains().items() for i in intents}
    for k, t in enumerate(long):  # a domain's 15 intents make 3 consecutive tasks
        assert {domain_of[i] for i in t.classes} == {t.name.split(".")[0]}
        assert t.name.endswith(f".{k % 3 + 1}")
    # an intent holds the same requests however the intents are grouped, and fewer are a prefix of more
    default = {t.train.labels[0]: t.train.inputs[:CLINC150_TRAIN] for t in builtin_tasks("builtin:clinc150")}
    for t in long:
        first = t.train.labels[0]
        if first in default:
            assert t.train.inputs[:CLINC150_TRAIN] == default[first]
    small = builtin_tasks("builtin:clinc150:tasks=2,classes=4,train=7,test=3", seed=0)
    assert [len(t.classes) for t in small] == [4, 4]
    assert all(len(t.train.inputs) == len(t.train.labels) == 28 for t in small)
    assert all(len(t.test.inputs) == len(t.test.labels) == 12 for t in small)
    assert small[0].train.inputs[:7] == long[0].train.inputs[:7]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:clinc150:tasks=11,classes=15", "11 tasks x 15 intents needs 165; CLINC150 has 150"),
        ("builtin:clinc150:tasks=31,classes=5", "needs 155; CLINC150 has 150"),
        ("builtin:clinc150:train=101", "100 train and 30 test requests per intent"),
        ("builtin:clinc150:test=31", "100 train and 30 test requests per intent"),
        ("builtin:clinc150:domains=3", "unknown option"),
        ("builtin:clinc150:tasks=0", "must be positive"),
    ],
)
def test_user_errors(spec, message):
    with pytest.raises(PMError, match=message):
        builtin_tasks(spec)


def test_attribution_and_data_ship_in_the_package():
    data = resources.files("pmserve.data")
    licence = (data / "LICENSE-clinc150").read_text(encoding="utf-8")
    for needle in (
        "Larson",
        "An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction",
        "EMNLP",
        "https://github.com/clinc/oos-eval",
        "Attribution 3.0",
        "What was changed",
    ):
        assert needle in licence, needle
    assert (data / "clinc150.json.gz").is_file()
    # the wheel carries them: pyproject's package data names both (an editable install reads the checkout)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in ("LICENSE-clinc150", "clinc150.json.gz"):
        assert any(fnmatch.fnmatch(name, g) for g in globs["pmserve.data"]), name
