"""The P&M perturbation: scale the current task's LoRA branch by s in {1 - eps, 1, 1 + eps}, each with p = 1/3.

Training at a random point of {theta, theta + eps Delta, theta - eps Delta} back-propagates, in expectation,
the task loss plus (eps^2 / 3) Delta^T H Delta: a Hessian regulariser at no extra pass. s multiplies the branch
output (gradients flow through it), drawn once per step or, with per="sample", once per example in the batch.
It is not Gaussian noise: the paper shows that does not help.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def draw_scales(n: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of s from {1 - eps, 1, 1 + eps} with equal probability."""
    choice = torch.randint(0, 3, (n,), generator=generator)
    return 1.0 + eps * (choice.float() - 1.0)


class Perturbation:
    """The perturbation in PyTorch, on PEFT LoRA layers.

    Per step, s is folded into each layer's LoRA scaling for the step (PEFT computes B A x * scaling anyway),
    so the perturbation adds no operation at all. Per sample, forward hooks on every LoRA B projection multiply
    its output row by row by that sample's s.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        eps: float,
        per: str = "step",
        seed: int = 0,
        adapter: str = "default",
    ):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if per not in ("step", "sample"):
            raise ValueError(f"per must be 'step' or 'sample', got {per!r}")
        self.eps, self.per, self.adapter = eps, per, adapter
        self.generator = torch.Generator().manual_seed(seed)
        self.s: torch.Tensor | None = None
        self.layers = list(layers.values()) if eps > 0 else []
        self.scaling = [layer.scaling[adapter] for layer in self.layers]
        hooked = self.layers if per == "sample" else []
        self.handles = [layer.lora_B[adapter].register_forward_hook(self._hook) for layer in hooked]

    def draw(
        self, batch_size: int, device: torch.device | str = "cpu", rows: slice | None = None
    ) -> torch.Tensor | None:
        """Draw s for the next step: shape (1,) per step, (batch_size,) per sample.

        `rows` keeps one rank's rows of a global batch: every rank draws the whole batch's factors, so each
        sample gets the same s whichever rank computes it.
        """
        if self.eps == 0:
            return None
        s = draw_scales(1 if self.per == "step" else batch_size, self.eps, self.generator)
        self.s = (s if self.per == "step" or rows is None else s[rows]).to(device)
        if self.per == "step":
            self._set_scaling(float(s))
        return self.s

    def off(self) -> None:
        self.s = None
        self._set_scaling(1.0)

    def _set_scaling(self, s: float) -> None:
        _scale_branches(self.layers, self.scaling, s, self.adapter)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if self.s is None:
            return None
        s = self.s.to(output.dtype)
        return output * s.view(-1, *([1] * (output.dim() - 1)))

    def remove(self) -> None:
        self.off()
        for h in self.handles:
            h.remove()
        self.handles = []


def _scale_branches(layers: list[nn.Module], scaling: list[float], s: float, adapter: str) -> None:
    for layer, base in zip(layers, scaling):
        layer.scaling[adapter] = base * s


@contextmanager
def branch_scale(layers: dict[str, nn.Module], s: float, adapter: str = "default"):
    """Every LoRA branch of `layers` times s inside the block: the model at W_hat_{t-1} + s Delta_t."""
    mods = list(layers.values())
    scaling = [layer.scaling[adapter] for layer in mods]
    _scale_branches(mods, scaling, s, adapter)
    try:
        yield
    finally:
        _scale_branches(mods, scaling, 1.0, adapter)


# ----------------------------------------------------------------------------------------------------
# The same perturbation through the fused Triton kernel (pmserve.kernels.fused_lora_linear)
# ----------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """The fused kernel's seed for draw number ``step`` (0-based) of a run seeded with ``seed``.

    A splitmix64 mix of (seed, step), cut to [0, 2**31) so Triton always passes it as int32 (one
    kernel signature). Deterministic: the same (seed, step) always gives the same draws.
    """
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(step) + 1) * 0xD1B54A32D192ED03) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def _unsupported(layer: nn.Module, adapter: str) -> str | None:
    """Why the fused kernel cannot run ``adapter`` of the PEFT LoRA layer ``layer`` (None: it can)."""
    from peft.tuners.lora import Linear as LoraLinear

    from .kernels import MAX_RANK  # ImportError without Triton

    if not isinstance(layer, LoraLinear):
        return f"a {type(layer).__name__}, not a PEFT lora.Linear"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"its base layer is a {type(base).__name__}, not a torch.nn.Linear"
    if base.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weights of dtype {base.weight.dtype} (the kernel takes float32, bfloat16, float16)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out is set"
    if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
        return f"adapter {adapter!r} is a LoRA variant (DoRA, ...)"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return f"adapter {adapter!r} has lora_bias"
    drop = layer.lora_dropout[adapter]
    if not isinstance(drop, nn.Identity) and not (isinstance(drop, nn.Dropout) and drop.p == 0):
        return f"adapter {adapter!r} has LoRA dropout (the kernel has none)"
    rank = layer.lora_A[adapter].weight.shape[0]
    if not 1 <= rank <= MAX_RANK:
        return f"adapter {adapter!r} has rank {rank} (the kernel takes 1 to {MAX_RANK})"
    return None


def fused_unsupported(layers: dict[str, nn.Module]) -> str | None:
    """None when every adapter of every layer can run through the fused kernel, else a message
    naming the first layer that cannot and why. Needs Triton."""
    for name, layer in layers.items():
        for adapter in getattr(layer, "lora_A", {}):
            why = _unsupported(layer, adapter)
            if why is not None:
                return f"{name}: {why}"
    return None


#: Whether ``--kernel auto`` may choose the fused kernel on CUDA: only where it was measured faster than the
#: PyTorch path. The first design was measured slower (BENCHMARKS.md, H200); the cuBLAS + rank-space redesign
#: (issue 39) has no GPU figures yet. Set True once benchmarks/gpu_check.sh's "targets" are met.
AUTO_CHOOSES_FUSED = False


def use_fused_kernel(kernel: str, device, layers: dict[str, nn.Module] | None = None) -> bool:
    """Whether training should run the LoRA layers through the fused kernel (``--kernel``).

    "torch": never. "triton": always; PMError when the kernel cannot run on ``device`` (no CUDA, no
    Triton, and TRITON_INTERPRET=1 not set) or cannot run one of ``layers``. "auto": only where the
    kernel was measured faster (``AUTO_CHOOSES_FUSED``; nowhere yet), on a CUDA device with Triton
    importable (never the interpreter, which is for tests) and, when ``layers`` is given, only if
    the kernel can run all of them.
    """
    from . import kernels
    from .errors import PMError

    if kernel == "torch":
        return False
    if isinstance(device, torch.Tensor):
        device = device.device
    if kernel == "triton":
        if not kernels.fused_lora_available(device):
            raise PMError("--kernel: triton needs a CUDA device (or TRITON_INTERPRET=1)")
        why = fused_unsupported(layers) if layers is not None else None
        if why is not None:
            raise PMError(f"--kernel: triton cannot run LoRA layer {why}")
        return True
    if kernel == "auto":
        if not AUTO_CHOOSES_FUSED:
            return False
        if torch.device(device).type != "cuda" or not kernels.fused_lora_available(device):
            return False
        if kernels.fused_lora_interpreted():
            return False
        return layers is None or fused_unsupported(layers) is None
    raise PMError(f"--kernel: must be auto, torch or triton, got {kernel!r}")


class FusedPerturbation:
    """:class:`Perturbation` through the fused LoRA kernel: same interface, same law of s.

    Replaces the ``forward`` of every given PEFT ``lora.Linear`` (``adapters.lora_layers``) with one
    call of :func:`pmserve.kernels.fused_lora_linear` (base matmuls in cuBLAS, the LoRA branch and the
    factor s in Triton's rank-space kernels; s drawn inside them); :meth:`remove` restores the
    original forwards. Layers whose adapters are disabled or merged run their original forward.

    Each :meth:`draw` starts a step with its own kernel seed, ``step_seed(seed, step)``, shared by
    every layer: per="step" gives one s for the whole model's LoRA branch (as the hook version);
    per="sample" gives one s per sample (row b of the batch, shared by its tokens and by every
    layer). Until the first draw and after :meth:`off`, the layers compute plain LoRA (eps = 0,
    still fused). With ``eps=0`` they always do, and :meth:`draw` returns None: the class then only
    swaps PEFT's LoRA path for the kernel.

    The kernel computes in the activations' dtype (the autocast dtype under autocast), casting the
    LoRA weights to it; the base weight and bias must be frozen.
    """

    def __init__(self, layers: dict[str, nn.Module], eps: float, per: str = "step", seed: int = 0):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if per not in ("step", "sample"):
            raise ValueError(f"per must be 'step' or 'sample', got {per!r}")
        from .kernels import fused_lora_linear, perturbation_scales  # ImportError without Triton

        why = fused_unsupported(layers)
        if why is not None:
            raise ValueError(f"layers: the fused kernel cannot run {why}")
        self._kernel, self._scales = fused_lora_linear, perturbation_scales
        self.eps, self.per, self.seed = float(eps), per, int(seed)
        self.step = 0  # draws so far
        self.step_seed: int | None = None  # the current step's kernel seed; None = off
        self.batch_size: int | None = None
        self.s: torch.Tensor | None = None
        self._saved: dict[str, tuple[nn.Module, object]] = {}
        for name, layer in layers.items():
            previous = layer.__dict__.get("forward", _NO_FORWARD)
            self._saved[name] = (layer, previous)
            original = layer.forward  # the bound class forward, or an earlier instance override
            layer.forward = self._make_forward(name, layer, original)

    def draw(
        self, batch_size: int, device: torch.device | str = "cpu", rows: slice | None = None
    ) -> torch.Tensor | None:
        """Start the next step: returns its s, shape (1,) per step or (batch_size,) per sample
        (the factors the kernel will draw), or None with eps = 0. `rows`: this rank's part of a global
        batch; the kernel draws s by local row, so per sample it cannot take a part (ValueError)."""
        if self.eps == 0:
            return None
        if rows is not None:
            part = range(batch_size)[rows]
            if self.per == "sample" and len(part) != batch_size:
                raise ValueError(
                    "rows: the fused kernel draws per-sample s by local row, not by global sample"
                )
            batch_size = len(part)
        self.step_seed = step_seed(self.seed, self.step)
        self.step += 1
        self.batch_size = int(batch_size)
        n = 1 if self.per == "step" else self.batch_size
        self.s = self._scales(self.step_seed, n, self.eps, per_row=self.per == "sample", device=device)
        return self.s

    def off(self) -> None:
        """No perturbation until the next draw (the layers keep the fused kernel, with eps = 0)."""
        self.s = None
        self.step_seed = None

    def remove(self) -> None:
        """Give every layer its original forward back."""
        for layer, previous in self._saved.values():
            if previous is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self._saved = {}
        self.off()

    def _make_forward(self, name: str, layer: nn.Module, original):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self._forward(name, layer, original, x, *args, **kwargs)

        return forward

    def _forward(self, name: str, layer: nn.Module, original, x: torch.Tensor, *args, **kwargs):
        on = self.step_seed is not None
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.disable_adapters or layer.merged or not active:
            return original(x, *args, **kwargs)  # no LoRA branch: nothing to fuse or perturb
        if args or any(v is not None for v in kwargs.values()):
            if on:
                raise RuntimeError(f"{name}: the fused LoRA kernel takes no extra forward arguments")
            return original(x, *args, **kwargs)
        if len(active) != 1:
            raise RuntimeError(f"{name}: {len(active)} active adapters; the fused kernel runs one")
        adapter = active[0]
        base = layer.get_base_layer()
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)

        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        rows_per_draw = 1
        per_row = on and self.per == "sample"
        if per_row:
            rows = x.numel() // max(x.shape[-1], 1)
            if rows % self.batch_size:
                raise RuntimeError(
                    f"{name}: {rows} input rows are not a whole number per sample of the batch of "
                    f"{self.batch_size} given to draw()"
                )
            rows_per_draw = max(rows // self.batch_size, 1)
        return self._kernel(
            cast(x),
            cast(base.weight),
            cast(base.bias),
            cast(layer.lora_A[adapter].weight),
            cast(layer.lora_B[adapter].weight),
            float(layer.scaling[adapter]),
            eps=self.eps if on else 0.0,
            seed=self.step_seed if on else 0,
            per_row=per_row,
            rows_per_draw=rows_per_draw,
        )


_NO_FORWARD = object()
