"""The closed-form alphas of pm from the files in one streaming pass, without holding any weight-sized sum.

Streaming: alpha_t is one number over every adapted module, and it depends on W_hat_{t-1}, which depends on the
alphas before it. Rather than holding W_hat, S_F and S_Ft for the whole model, note that all of them are linear
combinations of the task vectors, so the closed form needs only the Fisher-weighted Gram matrices
H^k_ij = <Delta_i, F_k Delta_j> summed over modules (T x T numbers per Fisher). One pass over the modules computes
them, each Fisher read once, in row blocks of the weight; the recurrence then replays on T x T matrices
(recurrence.gram_alphas) and a second pass (execute.py) writes the output. Memory stays a few blocks of T x 8M numbers
whatever the model size; compute is one T x T Gram product per module and Fisher (one in all for the identity
Hessian). Every other method needs one pass.

The Fisher of pm: each adapter's fisher.safetensors (what `pmserve train` writes); for adapters without one,
computed from --data (task t's training data at theta*_t, data_fisher.DataFisher, held in memory: it needs the
whole model loaded anyway), else the identity Hessian F = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import PMError
from ..formats.peft import AdapterInput
from ..tensor_io import InMemoryTensors
from .inputs import Inputs
from .recurrence import gram_alphas, sequence_step, theta_star

FisherFor = Callable[[int, list[float]], dict[str, torch.Tensor]]
GRAM_BLOCK = 1 << 23  # elements of one row block of the stacked task vectors (64 MiB in float64)


def stacked_factors(
    adapters: list[AdapterInput], module: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[A_1; ...; A_T], [s_1 B_1 ... s_T B_T] and the (T x sum r_t) 0/1 matrix of which rank rows are task t's."""
    facs = [a.factors(module) for a in adapters]
    a_cat = torch.cat([fa.to(dtype) for fa, _ in facs], 0)
    b_cat = torch.cat([a.modules[module].scaling * fb.to(dtype) for a, (_, fb) in zip(adapters, facs)], 1)
    blocks = torch.zeros(len(adapters), a_cat.shape[0], dtype=dtype)
    k = 0
    for t, (fa, _) in enumerate(facs):
        blocks[t, k : k + fa.shape[0]] = 1.0
        k += fa.shape[0]
    return a_cat, b_cat, blocks


def factor_gram(adapters: list[AdapterInput], module: str) -> torch.Tensor:
    """One module's share of G_ij = <Delta_i, Delta_j> (the identity-Hessian Gram matrix) from the factors alone:
    <s_i B_i A_i, s_j B_j A_j> = s_i s_j sum((B_i^T B_j) * (A_i A_j^T)), float64, no weight-sized tensor."""
    a_cat, b_cat, blocks = stacked_factors(adapters, module, torch.float64)
    return blocks @ ((b_cat.T @ b_cat) * (a_cat @ a_cat.T)) @ blocks.T


def adapter_theta(inputs: Inputs, index: int, alphas: list[float]) -> dict[str, torch.Tensor]:
    """theta*_t - W_0 of adapter `index` for every module (recurrence.theta_star), D_{t-1} rebuilt from the
    alphas before it when the adapter is chained."""
    ads = inputs.adapters
    out = {}
    for k in inputs.modules:
        merged = None
        if ads[index].kind == "chained":
            for a, al in zip(ads[:index], alphas):
                merged = sequence_step(merged, a.delta(k), al, a.kind)
        out[k] = theta_star(ads[index].kind, merged, ads[index].delta(k))
    return out


def module_grams(
    adapters: list[AdapterInput], module: str, fishers: list[int | None]
) -> dict[int | None, torch.Tensor]:
    """One module's share of H^k_ij = <Delta_i, F_k Delta_j> for each k in `fishers` (None: F = 1), float64.

    The task vectors are stacked as rows of X (T x n) and H^k = (X * F_k) X^T, computed block by block of the
    weight's rows so memory stays T x GRAM_BLOCK whatever the module's size.
    """
    facs = [a.factors(module) for a in adapters]
    shape = adapters[0].delta_shape(module)
    fis = {k: adapters[k].fisher_of(module) for k in fishers if k is not None}
    out = {k: torch.zeros(len(adapters), len(adapters), dtype=torch.float64) for k in fishers}
    rows = max(1, GRAM_BLOCK // (len(adapters) * shape[1]))
    for r in range(0, shape[0], rows):
        # Delta[r:r+rows] = scaling B[r:r+rows] A (or its transpose for fan_in_fan_out), as lora_delta computes it
        x = torch.stack([a.delta_rows(module, r, r + rows, f).reshape(-1) for a, f in zip(adapters, facs)])
        x = x.double()
        for k in fishers:
            y = x if k is None else x * fis[k][r : r + rows].reshape(1, -1).double()
            out[k] += y @ x.T
    return out


def pm_alphas(
    inputs: Inputs,
    identity: bool,
    clip: bool,
    log: Callable[[str], None],
    fisher_for: FisherFor | None = None,
) -> list[float]:
    """alpha_1..alpha_T of the closed form, as `pmserve train` computes them, from one streaming pass.

    The pass reads each module's factors and each Fisher once and adds the module's share of the Gram matrices
    H^k (module_grams); gram_alphas replays the recurrence on them. `identity` uses F_k = 1 (one Gram matrix).
    An adapter without a Fisher gets `fisher_for(index, alphas before it)`: independent adapters all up front,
    chained ones when the alphas their theta*_t depends on are known (then the pass is repeated for the new H^k).
    """
    ads = inputs.adapters
    kinds = [a.kind for a in ads]

    def compute(ks: list[int | None]) -> dict[int | None, torch.Tensor]:
        total = {k: torch.zeros(len(ads), len(ads), dtype=torch.float64) for k in ks}
        for m in inputs.modules:
            if ks == [None]:
                total[None] += factor_gram(ads, m)
                continue
            for k, h in module_grams(ads, m, ks).items():
                total[k] += h
        return total

    def get_fisher(i: int, alphas: list[float]) -> None:
        a = ads[i]
        if fisher_for is None:
            raise ValueError(f"{a.path}: no Fisher and no way to compute one")
        fisher = fisher_for(i, alphas)
        if not all(torch.isfinite(f).all() for f in fisher.values()):
            raise PMError(f"--data: the Fisher of {a.path} computed from task {i + 1} holds NaN or Inf")
        a.fisher, a.fisher_source = InMemoryTensors(fisher, f"{a.path} (--data)"), "data"
        log(f"fisher of {a.name} from --data task {i + 1}")

    if identity:
        g = compute([None])[None]
        alphas = gram_alphas(kinds, [g] * len(ads), clip)
    else:
        for i, a in enumerate(ads):
            if a.fisher is None and (a.kind == "independent" or i == 0):
                get_fisher(i, [])  # theta*_i does not depend on any alpha
        grams: dict[int, torch.Tensor] = {}
        alphas = []
        for t in range(1, len(ads) + 1):
            if ads[t - 1].fisher is None:
                get_fisher(t - 1, alphas)
            if t - 1 not in grams:
                grams.update(
                    compute([k for k, a in enumerate(ads) if a.fisher is not None and k not in grams])
                )
            alphas = gram_alphas(kinds, [grams[k] for k in range(t)], clip)
    for t, a in enumerate(alphas[1:], 2):
        log(f"alpha_{t} = {a:.6g}")
    return alphas


def data_fisher(
    inputs: Inputs, data: str, seed: int, samples: int, labels: str, curvature: str = "profile"
) -> FisherFor:
    """The Fisher of each adapter without one, from task t of --data at its theta*_t (data_fisher.DataFisher),
    scaled to the task's loss profile along the adapter's own Delta_t unless `curvature` is fisher."""
    from ..tasks import load_tasks
    from .data_fisher import DataFisher  # here: it imports transformers, needed only with --data

    ads = inputs.adapters
    tasks = load_tasks(data, seed)
    if len(tasks) != len(ads):
        raise PMError(
            f"--data: {data} has {len(tasks)} tasks for {len(ads)} adapters (task t pairs with adapter t)"
        )
    for a, task in zip(ads, tasks):
        if a.labels and set(a.labels) != set(task.classes):
            raise PMError(
                f"--data: task {task.name} has labels {sorted(task.classes)}, but {a.path} was trained on "
                f"{sorted(a.labels)}"
            )
    model = DataFisher(
        inputs.base.spec,
        inputs.modules,
        tasks,
        seed,
        samples,
        max_length=inputs.max_length,
        labels=labels,
        curvature=curvature,
    )

    def fisher_for(index: int, alphas: list[float]) -> dict[str, torch.Tensor]:
        # the adapter's own Delta_t, for the loss profile only (fisher: the Fisher as it is)
        delta = {m: ads[index].delta(m) for m in inputs.modules} if curvature == "profile" else None
        return model(index, adapter_theta(inputs, index, alphas), delta)

    return fisher_for
