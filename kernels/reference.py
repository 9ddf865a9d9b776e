"""Plain-PyTorch reference for the fused LoRA linear with a Perturb-and-Merge factor.

    y = x W^T + bias + s * scaling * (x A^T) B^T

``s`` is the Perturb-and-Merge factor: a Python float (one value for the call) or a tensor of shape
``(rows,)`` holding one value per row of ``x`` flattened to ``(rows, in_features)``. The reference does
not draw ``s`` itself; tests obtain the kernel's draws from
:func:`pmserve.kernels.fused_lora.perturbation_scales` and pass them here.

Everything is ordinary autograd, so gradients of the reference are the ground truth the fused
kernel's backward is checked against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    s: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Reference LoRA linear with the perturbation factor ``s`` applied to the LoRA branch.

    Shapes: ``x`` (..., in), ``weight`` (out, in), ``bias`` (out,) or None, ``lora_A`` (r, in),
    ``lora_B`` (out, r). ``s`` is a float or a tensor with one value per flattened row of ``x``
    (shape ``(rows,)``; a 0-d tensor is broadcast). Returns a tensor of ``x``'s dtype; the product of
    the LoRA branch with ``s * scaling`` is formed in float32 before it is cast back.
    """
    base = F.linear(x, weight, bias)
    low_rank = F.linear(F.linear(x, lora_A), lora_B)
    if isinstance(s, torch.Tensor):
        rows = math.prod(x.shape[:-1])
        if s.dim() == 0:
            factor = s.to(device=x.device, dtype=torch.float32) * scaling
        else:
            if s.numel() != rows:
                raise ValueError(f"s: expected {rows} values (one per row of x), got shape {tuple(s.shape)}")
            factor = s.to(device=x.device, dtype=torch.float32).reshape(*x.shape[:-1], 1) * scaling
    else:
        factor = float(s) * float(scaling)
    return base + (low_rank.float() * factor).to(base.dtype)
