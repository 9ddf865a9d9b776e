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
