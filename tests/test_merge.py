"""The closed-form P&M coefficient against a brute-force minimiser, and the accumulator form against the sum."""

import numpy as np
import pytest
import torch

from pmserve.merging.recurrence import FisherSums, alpha_terms, chained_merge, closed_form_alpha, task_alpha


def objective(a: float, merged, delta, fishers, thetas) -> float:
    """sum_i (W_t - theta_i)^T F_i (W_t - theta_i) with W_t = W_{t-1} + a Delta_t, summed over modules."""
    total = 0.0
    for k in delta:
        w = merged[k] + a * delta[k]
        total += sum(float(torch.sum(f[k] * (w - th[k]) ** 2)) for f, th in zip(fishers, thetas))
    return total


def random_sequence(T: int, seed: int):
    """Random chained tasks: per-task Fishers, task vectors, and the thetas they imply with given alphas."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (5, 7), "b": (3, 4)}
    merged = {k: torch.zeros(s) for k, s in shapes.items()}
    fishers, thetas, deltas = [], [], []
    for _ in range(T):
        delta = {k: torch.randn(s, generator=g, dtype=torch.float64).float() for k, s in shapes.items()}
        fishers.append(
            {k: torch.rand(s, generator=g, dtype=torch.float64).float() ** 2 for k, s in shapes.items()}
        )
        thetas.append({k: merged[k] + delta[k] for k in shapes})
        deltas.append(delta)
        merged = chained_merge(merged, delta, 0.3 + 0.4 * torch.rand(1, generator=g).item())
    return fishers, thetas, deltas


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_brute_force_minimiser(seed):
    fishers, thetas, deltas = random_sequence(4, seed)
    sums = FisherSums()
    merged = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    for t, (f, th, d) in enumerate(zip(fishers, thetas, deltas), 1):
        merged = {k: th[k] - d[k] for k in d}  # W_{t-1} implied by the chain
        sums.add(f, th)
        a = task_alpha("pm", t, merged, d, sums, clip=False)
        grid = np.linspace(-1.0, 2.0, 30001)
        vals = [objective(x, merged, d, fishers[:t], thetas[:t]) for x in grid]
        best = grid[int(np.argmin(vals))]
        assert a == pytest.approx(best, abs=2e-4)
        clipped = task_alpha("pm", t, merged, d, sums, clip=True)
        assert clipped == pytest.approx(min(max(best, 0.0), 1.0), abs=2e-4)


def test_accumulators_equal_sum_over_stored_fishers():
    fishers, thetas, deltas = random_sequence(5, 7)
    sums = FisherSums()
    for f, th in zip(fishers, thetas):
        sums.add(f, th)
    merged = {k: thetas[-1][k] - deltas[-1][k] for k in deltas[-1]}
    num = den = 0.0
    for k, d in deltas[-1].items():  # the definition: sum over tasks i of (W_{t-1} - theta_i)^T F_i Delta_t
        for f, th in zip(fishers, thetas):
            num -= float(torch.sum((merged[k] - th[k]) * f[k] * d))
            den += float(torch.sum(f[k] * d * d))
    terms = [alpha_terms(merged[k], d, sums.S_F[k], sums.S_Ft[k]) for k, d in deltas[-1].items()]
    assert sum(n for n, _ in terms) == pytest.approx(num, rel=1e-5)
    assert sum(d for _, d in terms) == pytest.approx(den, rel=1e-5)
    restored = FisherSums.from_state(sums.state())
    assert all(torch.equal(restored.S_F[k], sums.S_F[k]) for k in sums.S_F)


def test_alpha_one_for_first_task_and_simple_methods():
    fishers, thetas, deltas = random_sequence(1, 3)
    sums = FisherSums()
    sums.add(fishers[0], thetas[0])
    zero = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    assert task_alpha("pm", 1, zero, deltas[0], sums) == 1.0
    # the formula itself also gives 1 at t = 1 (D_0 = 0 makes num equal den)
    assert closed_form_alpha(
        [alpha_terms(zero[k], d, sums.S_F[k], sums.S_Ft[k]) for k, d in deltas[0].items()]
    ) == pytest.approx(1.0)
    assert task_alpha("seq", 4, zero, deltas[0]) == 1.0
    assert task_alpha("avg", 4, zero, deltas[0]) == 0.25
    assert closed_form_alpha([(0.0, 0.0)]) == 0.0


def test_merge_step_is_convex_combination():
    prev = {"w": torch.tensor([1.0, 2.0])}
    theta = {"w": torch.tensor([3.0, -2.0])}
    delta = {"w": theta["w"] - prev["w"]}
    out = chained_merge(prev, delta, 0.25)
    assert torch.allclose(out["w"], 0.75 * prev["w"] + 0.25 * theta["w"])


def clip_edge_case(edge: str, shapes: dict[str, tuple[int, ...]], seed: int = 0):
    """Three independent tasks (theta*_i - W_0 = Delta_i, D_1 = Delta_1, D_2 = D_1 + alpha_2 (Delta_2 - D_1)) whose
    third step u = Delta_3 - D_2 has an unclipped closed-form alpha_3 below 0 (edge "low") or above 1 ("high").

    With v = Delta_2 - Delta_1, the pull of the first two tasks at D_2 is g = sum_{i<3} F_i (theta_i - D_2) =
    (-alpha_2 F_1 + (1 - alpha_2) F_2) v (orthogonal to v: that is what alpha_2 minimises), and for u = s g the
    minimiser is alpha_3 = (s <F_3 g, g> + |g|^2) / (s <(F_1 + F_2 + F_3) g, g>). s = |g|^2 / (2 <(F_1 + F_2) g, g>)
    gives 1 + <(F_1+F_2) g,g> / <S_F g,g> > 1; s = -|g|^2 / (2 <F_3 g, g>) gives -<F_3 g,g> / <S_F g,g> < 0.
    Returns (fishers, thetas, alpha_2, D_2, u, the unclipped alpha_3), all float64.
    """
    g = torch.Generator().manual_seed(seed)
    fishers = [
        {k: torch.rand(s, generator=g, dtype=torch.float64) ** 2 + 0.05 for k, s in shapes.items()}
        for _ in range(3)
    ]
    thetas = [
        {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(2)
    ]
    f1, f2, f3 = fishers
    v = {k: thetas[1][k] - thetas[0][k] for k in shapes}
    a2 = sum(float((f2[k] * v[k] ** 2).sum()) for k in shapes) / sum(
        float(((f1[k] + f2[k]) * v[k] ** 2).sum()) for k in shapes
    )
    d2 = {k: thetas[0][k] + a2 * v[k] for k in shapes}
    pull = {k: (-a2 * f1[k] + (1 - a2) * f2[k]) * v[k] for k in shapes}
    gg = sum(float((pull[k] ** 2).sum()) for k in shapes)
    q12 = sum(float(((f1[k] + f2[k]) * pull[k] ** 2).sum()) for k in shapes)
    q3 = sum(float((f3[k] * pull[k] ** 2).sum()) for k in shapes)
    if edge == "high":
        s, want = gg / (2 * q12), 1 + q12 / (q12 + q3)
    else:
        s, want = -gg / (2 * q3), -q3 / (q12 + q3)
    u = {k: s * pull[k] for k in shapes}
    thetas.append({k: d2[k] + u[k] for k in shapes})
    return fishers, thetas, a2, d2, u, want


def brute_force_alpha(merged, delta, fishers, thetas, lo: float = -3.0, hi: float = 3.0) -> float:
    """argmin over a of `objective` by grid search, coarse then fine (the objective is a convex quadratic)."""
    for _ in range(3):
        grid = np.linspace(lo, hi, 601)
        best = grid[int(np.argmin([objective(x, merged, delta, fishers, thetas) for x in grid]))]
        step = grid[1] - grid[0]
        lo, hi = best - 2 * step, best + 2 * step
    return float(best)


@pytest.mark.parametrize("edge", ["low", "high"])
def test_clip_reaches_both_edges(edge):
    """Unclipped alpha_3 < 0 or > 1 (the brute-force minimiser agrees); clip=True returns exactly 0.0 or 1.0."""
    shapes = {"a": (5, 7), "b": (3, 4)}
    fishers, thetas, a2, d2, u, want = clip_edge_case(edge, shapes)
    f32 = [{k: t.float() for k, t in x.items()} for x in (*fishers, *thetas)]
    fishers32, thetas32 = f32[:3], f32[3:]
    sums = FisherSums()
    sums.add(fishers32[0], thetas32[0])
    sums.add(fishers32[1], thetas32[1])
    step2 = {k: thetas32[1][k] - thetas32[0][k] for k in shapes}  # D_1 = Delta_1: an independent second task
    assert task_alpha("pm", 2, thetas32[0], step2, sums, clip=False) == pytest.approx(a2, abs=1e-6)
    sums.add(fishers32[2], thetas32[2])
    merged, delta = {k: t.float() for k, t in d2.items()}, {k: t.float() for k, t in u.items()}
    raw = task_alpha("pm", 3, merged, delta, sums, clip=False)
    best = brute_force_alpha(d2, u, fishers, thetas)
    assert (raw < -0.05) if edge == "low" else (raw > 1.05)
    assert raw == pytest.approx(want, abs=1e-5) and raw == pytest.approx(best, abs=1e-4)
    edge_value = 0.0 if edge == "low" else 1.0
    assert task_alpha("pm", 3, merged, delta, sums, clip=True) == edge_value  # exactly the edge
    assert task_alpha("pm", 3, merged, delta, sums) == edge_value  # clip is the default
    terms = [alpha_terms(merged[k], delta[k], sums.S_F[k], sums.S_Ft[k]) for k in shapes]
    assert closed_form_alpha(terms) == edge_value and closed_form_alpha(terms, clip=False) == raw


# ---- the curvature alpha weighs tasks by (merging.curvature)


def test_profile_curvature_is_the_least_squares_fit_and_never_negative():
    from pmserve.merging.curvature import profile_curvature

    points = (0.0, 0.25, 0.5, 0.75, 1.0)
    g = np.random.default_rng(0)
    losses = [0.3 + 1.7 / 2 * (1 - s) ** 2 + 0.05 * g.standard_normal() for s in points[:-1]] + [0.3]
    grid = np.linspace(0.0, 5.0, 50001)
    sse = [sum((ls - 0.3 - c / 2 * (1 - s) ** 2) ** 2 for s, ls in zip(points, losses)) for c in grid]
    assert profile_curvature(points, losses) == pytest.approx(grid[int(np.argmin(sse))], abs=2e-4)
    assert profile_curvature((0.0, 0.5, 1.0), (0.1, 0.2, 0.3)) == 0.0  # loss falls as the step shrinks


def test_rescaled_fisher_predicts_the_measured_curvature_along_its_step():
    from pmserve.merging.curvature import quadratic_form, rescale

    fishers, _, deltas = random_sequence(1, 3)
    scaled, k = rescale(fishers[0], deltas[0], 2.5)
    assert quadratic_form(scaled, deltas[0]) == pytest.approx(2.5, rel=1e-6)
    assert all(torch.allclose(scaled[m], k * fishers[0][m]) for m in scaled)  # the shape is the Fisher's
    assert rescale({m: torch.zeros_like(f) for m, f in fishers[0].items()}, deltas[0], 1.0)[1] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_profile_alpha_equals_brute_force_minimiser_of_its_objective(seed):
    """sum_i 1/2 (W_t - theta_i)^T k_i F_i (W_t - theta_i), k_i set by task i's measured curvature c_i."""
    from pmserve.merging.curvature import rescale

    fishers, thetas, deltas = random_sequence(4, 10 + seed)
    g = np.random.default_rng(seed)
    curvatures = g.uniform(0.1, 3.0, len(deltas))
    scaled = [rescale(f, d, c)[0] for f, d, c in zip(fishers, deltas, curvatures)]
    sums = FisherSums()
    for t, (f, th, d) in enumerate(zip(scaled, thetas, deltas), 1):
        merged = {k: th[k] - d[k] for k in d}
        sums.add(f, th)
        a = task_alpha("pm", t, merged, d, sums, clip=False)
        grid = np.linspace(-1.0, 2.0, 30001)
        best = grid[int(np.argmin([objective(x, merged, d, scaled[:t], thetas[:t]) for x in grid]))]
        assert a == pytest.approx(best, abs=2e-4)


def test_a_task_fit_with_near_certainty_keeps_its_weight_under_the_profile():
    """Task 2's Fisher is a millionth of task 1's (the LoRA fits it with near-certainty), but shrinking its step
    costs it as much as shrinking task 1's costs task 1: the paper's alpha_2 collapses, the profile's does not."""
    from pmserve.merging.curvature import rescale

    g = torch.Generator().manual_seed(0)
    shape = (6, 5)
    f1 = torch.rand(shape, generator=g) + 0.5
    f2 = 1e-6 * (torch.rand(shape, generator=g) + 0.5)
    d1, d2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    alphas = {}
    for name, fs in (
        ("fisher", (f1, f2)),
        ("profile", (rescale({"w": f1}, {"w": d1}, 1.0)[0]["w"], rescale({"w": f2}, {"w": d2}, 1.0)[0]["w"])),
    ):
        sums = FisherSums()
        sums.add({"w": fs[0]}, {"w": d1})
        merged = {"w": d1}  # alpha_1 = 1
        sums.add({"w": fs[1]}, {"w": d1 + d2})
        alphas[name] = task_alpha("pm", 2, merged, {"w": d2}, sums)
    assert alphas["fisher"] < 1e-4
    assert 0.2 < alphas["profile"] < 0.8


@pytest.mark.parametrize("n", [1, 7, 5000, 300_001])
def test_kth_largest_equals_kthvalue(n):
    """TIES' threshold: the radix selection against torch.kthvalue, with zeros, ties and a wide range of scales."""
    from pmserve.merging.execute import kth_largest

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))).abs()
    x[torch.rand(n, generator=g) < 0.2] = 0.0  # pruned-looking zeros
    x[: n // 3] = x[: n // 3].round(decimals=1)  # many exact ties
    for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
        assert kth_largest(lambda: [x.view(1, -1)], [k]) == [float(torch.kthvalue(x, n - k + 1).values)]


@pytest.mark.parametrize("n,p", [(0, 0.0), (31, 0.1), (32 * 50 + 7, 0.003), (32 * 50 + 7, 0.5), (4096, 1.0)])
def test_ones_at_equals_nonzero(n, p):
    """The chunked search for rare 1s in kth_largest's second pass against torch's plain nonzero: every 1 found,
    in order, in whole chunks and in the tail, sparse or dense."""
    from pmserve.merging.execute import _ones_at

    g = torch.Generator().manual_seed(n)
    flags = (torch.rand(n, generator=g) < p).to(torch.int32)
    assert torch.equal(_ones_at(flags), flags.nonzero().view(-1))


def test_ties_block_equals_peft_with_exact_ties():
    """The fused TIES block against peft's prune mask + majority sign + disjoint merge, on small integers so that
    sign sums of exactly 0, pruned zeros, all-pruned columns and negative weights all occur."""
    from peft.utils import merge_utils as mu

    from pmserve.merging.execute import ties_block

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (4, 9, 11), generator=g).float()
    thr = torch.tensor([1.0, 2.0, 3.0, float("inf")]).view(-1, 1, 1)
    w = torch.tensor([1.0, -0.5, 2.0, 1.0])
    pruned = x * (x.abs() >= thr)
    assert (pruned.sum(0) == 0).any() and ((pruned != 0).sum(0) == 0).any()
    want = mu.disjoint_merge(
        pruned * w.view(-1, 1, 1), mu.calculate_majority_sign_mask(pruned, method="total")
    )
    torch.testing.assert_close(ties_block(x.clone(), thr.view(-1).tolist(), w), want, rtol=1e-6, atol=0)


def test_kth_largest_over_blocks_of_several_tasks():
    """Several tasks' thresholds at once, their values arriving in uneven blocks (as TIES reads its row blocks):
    each row's k-th largest against torch.kthvalue of the whole row; k = 0 gives inf (prune everything)."""
    from pmserve.merging.execute import kth_largest

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 40, 25, generator=g).abs() * torch.tensor([1e-4, 1.0, 1e3]).view(3, 1, 1)
    rows[1, :10] = rows[1, :10].round(decimals=1)  # exact ties
    cuts = [0, 1, 7, 8, 23, 40]
    ks = [1, 499, 0]
    got = kth_largest(lambda: (rows[:, a:b] for a, b in zip(cuts, cuts[1:])), ks)
    flat = rows.reshape(3, -1)
    want = [float(torch.kthvalue(flat[t], flat.shape[1] - k + 1).values) for t, k in enumerate(ks[:2])]
    assert got == [*want, float("inf")]


@pytest.mark.parametrize("integers", [False, True])
def test_ties_by_rows_over_blocks(monkeypatch, integers):
    """ties_by_rows over many row blocks (its three passes: the histogram, the bucket's values, the merge)
    against peft's ties on the whole task vectors; with integer factors, where many values tie at
    the thresholds, against peft's sign election and disjoint merge under the documented mask |x| >= k-th
    largest (peft's topk keeps an arbitrary k of the tied values)."""
    from peft.utils import merge_utils as mu

    from pmserve.merging import execute

    g = torch.Generator().manual_seed(2)
    tasks, rows, cols, rank, density = 3, 37, 29, 4, 0.3
    left, right = torch.randn(tasks, rows, rank, generator=g), torch.randn(tasks, rank, cols, generator=g)
    if integers:
        left, right = left.round().clamp(-2, 2), right.round().clamp(-2, 2)
    monkeypatch.setattr(execute, "_row_factors", lambda adapters, module: (left, right))
    monkeypatch.setattr(execute, "TIES_BLOCK", tasks * cols * 4)  # blocks of 4 rows, the last one short
    w = torch.tensor([1.0, -0.5, 2.0])
    got, norms = execute.ties_by_rows([None] * tasks, "m", w, density)
    deltas = left @ right
    torch.testing.assert_close(torch.tensor(norms), deltas.flatten(1).norm(dim=1))
    if not integers:
        torch.testing.assert_close(got, mu.ties(list(deltas), w, density), rtol=1e-5, atol=1e-6)
        return
    k = int(density * rows * cols)
    thr = torch.stack([torch.kthvalue(d.abs().flatten(), rows * cols - k + 1).values for d in deltas])
    pruned = deltas * (deltas.abs() >= thr.view(-1, 1, 1))
    assert (pruned.abs() == thr.view(-1, 1, 1)).sum() > tasks * 5  # the ties are there
    want = mu.disjoint_merge(
        pruned * w.view(-1, 1, 1), mu.calculate_majority_sign_mask(pruned, method="total")
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "shape,density", [((1,), 0.5), ((37, 29), 0.123), ((1000, 333), 0.9), ((5, 4, 3), 0.3)]
)
def test_dare_prune_equals_peft_bit_for_bit(shape, density):
    """DARE's pruning by torch.rand against PEFT's random_pruning (torch.bernoulli) from the same seed: the same
    values to the bit, and the generator left in the same state; a bf16 input takes PEFT's own call."""
    from peft.utils import merge_utils as mu

    from pmserve.merging.methods import dare_prune

    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(11)
        want, after = mu.random_pruning(x.to(dtype), density, rescale=True), torch.rand(3)
        torch.manual_seed(11)
        got = dare_prune(x.to(dtype), density)
        assert torch.equal(got, want) and torch.equal(torch.rand(3), after)
        assert 0 < int((got == 0).sum()) < x.numel() or x.numel() == 1
