"""Ridge and prototype classifiers against direct computations; the continual-learning metrics by hand."""

import pytest
import torch
import torch.nn.functional as F

from pmserve.errors import PMError
from pmserve.heads import Prototypes, Ridge
from pmserve.metrics import summary


def data(n=60, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, dim, generator=g)
    labels = [f"c{int(i)}" for i in torch.randint(0, 4, (n,), generator=g)]
    return feats, labels


def test_ridge_equals_direct_least_squares():
    feats, labels = data()
    r = Ridge(8, size=16, seed=3, lam=0.5)
    r.fit(feats[:30], labels[:30])
    r.fit(feats[30:], labels[30:])  # incremental over two tasks
    H = torch.relu(feats @ r.P).double()
    Y = F.one_hot(torch.tensor([r.labels.index(y) for y in labels]), len(r.labels)).double()
    W = torch.linalg.lstsq(
        torch.cat([H, 0.5**0.5 * torch.eye(16, dtype=torch.float64)]),
        torch.cat([Y, torch.zeros(16, Y.shape[1], dtype=torch.float64)]),
    ).solution
    torch.testing.assert_close(r.W, W, rtol=1e-6, atol=1e-8)


def test_ridge_picks_lambda_and_validates():
    feats, labels = data(200)
    r = Ridge(8, size=32, seed=0)
    lam = r.fit(feats, labels)
    assert lam > 0 and r.W is not None
    with pytest.raises(PMError, match="--ridge-lambda"):
        Ridge(8, size=4, lam=-1.0)
    with pytest.raises(PMError, match="GiB"):
        Ridge(8, size=40000)


def test_prototype_incremental_equals_batch_and_brute_force():
    feats, labels = data()
    p = Prototypes(8)
    p.update(feats[:25], labels[:25])
    p.update(feats[25:], labels[25:])
    batch = Prototypes(8)
    batch.update(feats, labels)
    torch.testing.assert_close(p.means(), batch.means())
    q = torch.randn(10, 8)
    pred = [p.labels[i] for i in p.scores(q).argmax(1)]
    for row, guess in zip(q, pred):
        means = {y: feats[[i for i, lab in enumerate(labels) if lab == y]].mean(0) for y in set(labels)}
        best = max(means, key=lambda y: float(F.cosine_similarity(row, means[y], dim=0)))
        assert guess == best


def test_metrics_by_hand():
    acc = [[0.9], [0.7, 0.8], [0.6, 0.5, 1.0]]
    s = summary(acc)
    assert s["ACC"] == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert s["AAA"] == pytest.approx((0.9 + 0.75 + 0.7) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
