"""The P&M perturbation: scale the current task's LoRA branch by s in {1 - eps, 1, 1 + eps}, each with p = 1/3.

Training at a random point of {theta, theta + eps Delta, theta - eps Delta} back-propagates, in expectation,
the task loss plus (eps^2 / 3) Delta^T H Delta: a Hessian regulariser at no extra pass. s multiplies the branch
output (gradients flow through it), drawn once per step or, with per="sample", once per example in the batch.
It is not Gaussian noise: the paper shows that does not help.
"""

from __future__ import annotations

import torch
from torch import nn


def draw_scales(n: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of s from {1 - eps, 1, 1 + eps} with equal probability."""
    choice = torch.randint(0, 3, (n,), generator=generator)
    return 1.0 + eps * (choice.float() - 1.0)


class Perturbation:
    """Forward hooks on every LoRA B projection that multiply its output by the current s."""

    def __init__(self, lora_b_modules: list[nn.Module], eps: float, per: str = "step", seed: int = 0):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if per not in ("step", "sample"):
            raise ValueError(f"per must be 'step' or 'sample', got {per!r}")
        self.eps, self.per = eps, per
        self.generator = torch.Generator().manual_seed(seed)
        self.s: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook) for m in lora_b_modules] if eps > 0 else []

    def draw(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Draw s for the next step: shape (1,) per step, (batch_size,) per sample."""
        if self.eps == 0:
            return None
        self.s = draw_scales(1 if self.per == "step" else batch_size, self.eps, self.generator).to(device)
        return self.s

    def off(self) -> None:
        self.s = None

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if self.s is None:
            return None
        s = self.s.to(output.dtype)
        return output * s.view(-1, *([1] * (output.dim() - 1)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
