"""Ridge and prototype classifiers against direct computations; the continual-learning metrics by hand."""

import math

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


def explicit_gcv(H: torch.Tensor, Y: torch.Tensor, lam: float) -> float:
    """GCV by its definition: the hat matrix A = H (H^T H + lam I)^-1 H^T, n |Y - A Y|^2 / (n - tr A)^2."""
    n, p = H.shape
    A = H @ torch.linalg.solve(H.T @ H + lam * torch.eye(p, dtype=torch.float64), H.T)
    return float(n * ((Y - A @ Y) ** 2).sum() / (n - torch.trace(A)) ** 2)


def loo_error(H: torch.Tensor, Y: torch.Tensor, lam: float) -> float:
    """Leave-one-out squared error by brute force: n refits, each without one row."""
    n, p = H.shape
    err = 0.0
    for i in range(n):
        keep = torch.arange(n) != i
        W = torch.linalg.solve(
            H[keep].T @ H[keep] + lam * torch.eye(p, dtype=torch.float64), H[keep].T @ Y[keep]
        )
        err += float(((Y[i] - H[i] @ W) ** 2).sum())
    return err / n


def clustered(n: int, dim: int = 8, classes: int = 4, noise: float = 1.5, seed: int = 0):
    """Features around one centre per class: a problem where some lambda is clearly best."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ys = torch.randint(0, classes, (n,), generator=g)
    feats = centres[ys] + noise * torch.randn(n, dim, generator=g)
    return feats, [f"c{int(y)}" for y in ys]


@pytest.mark.parametrize("n", [40, 10])  # more rows than features, and fewer
def test_gcv_scores_equal_the_hat_matrix_definition(n):
    from pmserve.heads import gcv_scores

    feats, labels = clustered(n)
    r = Ridge(8, size=16, seed=1, lam=1.0)
    r.update(feats, labels)
    H = r.project(feats)
    Y = r._targets(labels)
    lams = (1e-2, 0.3, 10.0, 1e3)
    got = gcv_scores(r.G, r.Q, r.n, lams)
    want = [explicit_gcv(H, Y, lam) for lam in lams]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_gcv_scores_of_real_valued_targets_equal_the_hat_matrix_definition():
    from pmserve.heads import gcv_scores

    g = torch.Generator().manual_seed(6)
    H = torch.randn(30, 12, generator=g, dtype=torch.float64)
    Y = H @ torch.randn(12, 5, generator=g, dtype=torch.float64) + torch.randn(
        30, 5, generator=g, dtype=torch.float64
    )
    lams = (1e-2, 0.3, 10.0, 1e3)
    got = gcv_scores(H.T @ H, H.T @ Y, len(H), lams, tss=float(Y.pow(2).sum()))
    want = [explicit_gcv(H, Y, lam) for lam in lams]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def linear_ridge(dim: int) -> Ridge:
    """A ridge classifier whose projection is the identity, so a drift can be made exactly linear."""
    r = Ridge(dim, size=dim, seed=0)
    r.project = lambda feats: feats.detach().double()
    return r


def test_carry_gives_the_statistics_of_the_old_rows_under_the_new_backbone():
    g = torch.Generator().manual_seed(7)
    old, labels = clustered(50, seed=8)
    r = linear_ridge(8)
    r.fit(old, labels)
    M = torch.eye(8, dtype=torch.float64) + 0.2 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    new = torch.randn(300, 8, generator=g, dtype=torch.float64)
    r.carry(new, new @ M)  # the new task's rows before and after: the backbone's drift, exactly linear
    want = linear_ridge(8)  # the oracle: the old rows themselves, recomputed under the new backbone
    want.update(old.double() @ M, labels)
    torch.testing.assert_close(r.G, want.G, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(r.Q, want.Q, rtol=1e-3, atol=1e-6)
    G, Q = r.G.clone(), r.Q.clone()
    r.carry(new, new.clone())  # no drift: nothing moves
    torch.testing.assert_close(r.G, G, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.Q, Q, rtol=0, atol=1e-12)


def test_carry_shrinks_a_map_the_rows_cannot_tell_toward_no_drift():
    from pmserve.heads import drift_map

    g = torch.Generator().manual_seed(9)
    before = torch.randn(200, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(200, 8, generator=g, dtype=torch.float64)
    M, _ = drift_map(before, before + noise)  # "after" unrelated to "before" beyond the rows themselves
    assert float((M - torch.eye(8, dtype=torch.float64)).abs().max()) < 0.01  # least squares: 0.13
    exact, _ = drift_map(before, before @ (2 * torch.eye(8, dtype=torch.float64)))
    torch.testing.assert_close(exact, 2 * torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("rows", [30, 90])  # fewer rows than features (the dual form), and more (the primal)
def test_class_held_out_errors_equal_refitting_without_each_class(rows):
    from pmserve.heads import class_held_out_errors

    g = torch.Generator().manual_seed(4)
    B = torch.randn(rows, 50, generator=g, dtype=torch.float64)
    D = B @ (0.05 * torch.randn(50, 50, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        rows, 50, generator=g, dtype=torch.float64
    )
    groups = [f"c{i % 3}" for i in range(rows)]
    lams = (0.1, 1.0, 10.0)
    want = []
    for lam in lams:  # brute force: refit the primal ridge without each class, score it on that class
        err = 0.0
        for c in ("c0", "c1", "c2"):
            h = torch.tensor([y == c for y in groups])
            X = torch.linalg.solve(
                B[~h].T @ B[~h] + lam * torch.eye(50, dtype=torch.float64), B[~h].T @ D[~h]
            )
            err += float((B[h] @ X - D[h]).pow(2).sum())
        want.append(err)
    want.append(float(D.pow(2).sum()))  # "no fit": every held-out class keeps its whole drift
    torch.testing.assert_close(
        class_held_out_errors(B, D, groups, lams), torch.tensor(want, dtype=torch.float64)
    )


def test_a_drift_that_does_not_carry_across_classes_leaves_the_statistics_alone():
    from pmserve.heads import drift_map

    g = torch.Generator().manual_seed(5)
    eye = torch.eye(8, dtype=torch.float64)
    before = torch.randn(200, 8, generator=g, dtype=torch.float64)
    groups = ["a"] * 100 + ["b"] * 100
    E = 0.5 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    after = torch.cat([before[:100] @ (eye + E), before[100:]])  # one class drifts, the other does not
    assert drift_map(before, after, groups) is None  # "no drift"
    assert drift_map(before[:100], after[:100], groups[:100]) is None  # one class cannot tell
    assert float((drift_map(before, after)[0] - eye).abs().max()) > 0.1  # GCV on all rows fits it anyway
    shared = before @ (2 * eye)  # a drift every class shares is found either way
    torch.testing.assert_close(drift_map(before, shared, groups)[0], 2 * eye, rtol=0, atol=1e-3)
    r = linear_ridge(8)
    r.fit(*clustered(50, seed=6))
    G, Q = r.G, r.Q
    assert r.carry(before, after, groups) is None and r.G is G and r.Q is Q  # untouched, not recomputed
    assert r.carry(before, shared, groups) > 0 and r.G is not G  # the map's penalty, for the run's record


def test_gcv_lambda_against_brute_force_leave_one_out_over_every_class_seen():
    from pmserve.heads import GCV_LAMBDAS

    feats, labels = clustered(120, seed=3)
    first = [y if y in ("c0", "c1") else "c0" for y in labels[:60]]  # task 1 has two of the classes ...
    r = Ridge(8, size=48, seed=2)
    r.fit(feats[:60], first)
    lam = r.fit(feats[60:], labels[60:])  # ... task 2: the choice covers both tasks' rows
    assert r.n == 120
    H = r.project(feats)
    Y = r._targets(first + labels[60:])
    grid = GCV_LAMBDAS[::2]
    loo = [loo_error(H, Y, x) for x in grid]
    best = grid[loo.index(min(loo))]
    assert abs(math.log10(lam) - math.log10(best)) <= 0.5  # within two of GCV's grid steps
    assert loo_error(H, Y, lam) <= 1.02 * min(loo)
    assert not r.on_edge


def test_ridge_reports_a_lambda_at_the_end_of_its_grid():
    from pmserve.heads import GCV_LAMBDAS

    feats, labels = clustered(200, noise=0.01, seed=4)  # noiseless: the smallest lambda fits best
    r = Ridge(8, size=8, seed=0)
    r.fit(feats, labels)
    assert r.on_edge and r.lam == GCV_LAMBDAS[0]
    g = torch.Generator().manual_seed(5)
    r = Ridge(8, size=64, seed=0)
    r.fit(torch.randn(30, 8, generator=g), [f"c{i % 5}" for i in range(30)])  # labels unrelated to features
    assert r.lam > 1.0


def test_saved_ridge_keeps_its_rule_and_count(tmp_path):
    from pmserve.heads import load_scorer, save_scorer

    feats, labels = clustered(50)
    r = Ridge(8, size=16, seed=1, select="holdout")
    r.fit(feats, labels)
    save_scorer(r, tmp_path, "c")
    back = load_scorer(tmp_path, "c")
    assert (back.select, back.n, back.lam) == ("holdout", 50, r.lam)
    with pytest.raises(PMError, match="--ridge-select"):
        Ridge(8, select="loo")
