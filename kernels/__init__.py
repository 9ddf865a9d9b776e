"""Fused LoRA + perturbation kernels (Triton) and their PyTorch references.

``import pmserve.kernels`` never imports Triton: the fused kernels live in
:mod:`pmserve.kernels.fused_lora` and are imported on first use of ``fused_lora_linear``,
``perturbation_scales`` or ``MAX_RANK``. Set ``TRITON_INTERPRET=1`` before that first use to run
them on the CPU through Triton's interpreter. Without Triton, ``fused_lora_available()`` is False
and the lazy names raise ImportError. Training routes PEFT's LoRA layers through the kernels with
:class:`pmserve.perturb.FusedPerturbation`.
"""

from __future__ import annotations

from typing import Any

from .reference import lora_linear_reference

__all__ = [
    "fused_lora_linear",
    "perturbation_scales",
    "lora_linear_reference",
    "fused_lora_available",
    "fused_lora_interpreted",
    "MAX_RANK",
]

_LAZY = ("fused_lora_linear", "perturbation_scales", "MAX_RANK")


def _load_fused():
    try:
        from . import fused_lora
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "triton" or exc.name.startswith("triton.")):
            raise ImportError(
                "pmserve.kernels: the fused LoRA kernels need Triton (pip install triton)"
            ) from exc
        raise
    return fused_lora


def fused_lora_available(device: Any = None) -> bool:
    """True when the fused kernels can run on ``device`` (a torch.device, string or tensor): Triton
    imports and the device is CUDA, or ``TRITON_INTERPRET=1`` is set (interpreter, any device)."""
    try:
        fused_lora = _load_fused()
    except ImportError:
        return False
    return fused_lora.fused_lora_available(device)


def fused_lora_interpreted() -> bool:
    """True when the fused kernels run through Triton's interpreter (TRITON_INTERPRET=1 was set
    before they were first imported): correct but slow, for tests. False without Triton."""
    try:
        fused_lora = _load_fused()
    except ImportError:
        return False
    return bool(fused_lora._INTERPRET)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_load_fused(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
