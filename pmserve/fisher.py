"""The diagonal Fisher of the adapted full weights, from exact per-sample gradients.

F = mean over samples of (d loss_n / d W)^2, loss_n at the label the caller gives (the true one: the empirical
Fisher; one drawn from the model: the true Fisher, see task_fisher), for every adapted matrix W (the full out x
in weight, not the LoRA factors: the merge acts on W). For a linear layer y = x W^T the per-sample gradient is
sum over tokens of g_n^T x_n, so one batched forward/backward with hooks on each adapted layer gives every
sample's gradient exactly; no per-sample backward loop. Samples never interact (no batch norm), so this is
exact. On several ranks (torchrun) each passes its own share of the samples, and the sums of squares and the
counts are summed over the ranks, so the mean is the one a single process computes over all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import distributed
from .adapters import Tensors


class _Capture:
    def __init__(self, layers: dict[str, nn.Module]):
        self.x: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._fwd(n)) for n, m in layers.items()]

    def _fwd(self, name: str):
        def hook(module, inputs, output):
            self.x[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.g.__setitem__(name, g.detach()))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


SAMPLES_PER_PRODUCT = 8


def add_squared_per_sample_grads(total: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """total += sum over samples n of (g_n^T x_n)^2, g (samples, tokens, out) and x (samples, tokens, in).

    The per-sample gradients are formed SAMPLES_PER_PRODUCT at a time and squared in place: a whole batch's at
    once (samples x out x in, 75 MB for one MiniLM feed-forward matrix at batch 32) is bound by memory traffic:
    on a 2-core CPU the whole Fisher pass took twice as long (benchmarks/experiments/fisher_products.py).
    """
    for k in range(0, g.shape[0], SAMPLES_PER_PRODUCT):
        per_sample = torch.bmm(g[k : k + SAMPLES_PER_PRODUCT].transpose(1, 2), x[k : k + SAMPLES_PER_PRODUCT])
        total += per_sample.square_().sum(0)


def diagonal_fisher(
    layers: dict[str, nn.Module],
    batches: Iterable[tuple[dict, torch.Tensor]],
    loss_fn: Callable[[dict, torch.Tensor], torch.Tensor],
) -> Tensors:
    """Mean squared per-sample gradient of `loss_fn` (summed over the batch) w.r.t. each layer's full weight.

    `layers` maps names to the adapted linear modules (LoRA-wrapped or plain); `loss_fn(batch, targets)` must
    return the SUM of per-sample losses so that each sample's gradient is its own.
    """
    cap = _Capture(layers)
    # out x in, as g^T x gives it; a layer that stores its weight as in x out (GPT-2's Conv1D, PEFT's
    # fan_in_fan_out) gets it transposed at the end, so the Fisher is in the weight's layout as Delta is
    flipped = {name for name, m in layers.items() if is_transposed(m)}
    total: Tensors = {
        name: torch.zeros_like(m.weight.T if name in flipped else m.weight, dtype=torch.float32)
        for name, m in layers.items()
    }
    n = 0
    try:
        for batch, targets in batches:
            cap.x.clear()
            cap.g.clear()
            loss = loss_fn(batch, targets)
            loss.backward()  # the output hooks catch each layer's output gradient
            for name in layers:
                x, g = cap.x[name].float(), cap.g[name].float()
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                g = g.reshape(g.shape[0], -1, g.shape[-1])
                add_squared_per_sample_grads(total[name], g, x)
            n += targets.shape[0]
    finally:
        cap.remove()
    for v in total.values():
        distributed.all_reduce_sum(v)
    n = int(distributed.all_reduce_sum(torch.tensor(n, device=next(iter(total.values())).device)).item())
    return {k: (v.T.contiguous() if k in flipped else v).div(max(n, 1)).cpu() for k, v in total.items()}


def is_transposed(module: nn.Module) -> bool:
    """Whether a (LoRA-wrapped or plain) layer stores its weight as in x out: transformers' Conv1D (GPT-2)."""
    if getattr(module, "fan_in_fan_out", False):
        return True
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)
