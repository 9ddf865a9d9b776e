"""Fused LoRA linear with the Perturb-and-Merge factor drawn inside the kernels (Triton + cuBLAS).

    y = x W^T + bias + s * scaling * (x A^T) B^T,     s in {1 - eps, 1, 1 + eps}, each with prob. 1/3

``s`` is drawn with Triton's Philox generator (``tl.randint``) from ``seed``: one draw per call
(``per_row=False``, every row uses Philox offset 0) or one per group of ``rows_per_draw``
consecutive rows of ``x`` flattened to ``(M, in)`` (``per_row=True``, row ``m`` uses offset
``m // rows_per_draw``; the default 1 gives one draw per row, and ``rows_per_draw=S`` on x of
shape ``(B, S, in)`` gives one draw per sample, shared by its S tokens). No noise tensor is materialised: the
backward kernel regenerates exactly the same draws from the saved seed, on the device (no host
synchronisation anywhere). ``eps == 0`` compiles the draw away and gives plain LoRA.

Pass a different ``seed`` every training step (e.g. the step counter, or ``hash((step, layer))``):
the same seed always gives the same draws. ``seed`` and ``rows_per_draw`` are not specialised on
by Triton, so a new value does not compile new kernels (keep seeds below 2**31: a larger one is
passed as int64, a second signature). ``pmserve.perturb.FusedPerturbation`` routes every LoRA layer
of a PEFT model through these kernels with one seed per training step.

Why this decomposition (issue 39). The first design ran the whole layer in Triton: a hand-written
``x W^T`` GEMM with the low-rank term in its epilogue. On an H200 it took 5x a plain ``nn.Linear``
at 4k tokens (d 4096, rank 16, bf16), though the LoRA branch adds 1.2% of the FLOPs: the GEMMs lost
to cuBLAS. The fastest LoRA implementations (LoRAFusion, arXiv 2510.00206; Unsloth's fast_lora)
leave the two full-size products to cuBLAS and fuse only what lives in rank space. So here
(M = tokens, K = in_features, N = out_features, r = rank padded to a power of two >= 16 as the
constexpr ``BLOCK_R``):

forward
  1. ``_rank_proj_kernel`` (Triton): ``S' = s * scaling * (x A^T)`` (M x r, x's dtype), s drawn
     per row tile from the seed. The perturbation lives in rank space: a per-row s scales an M x r
     tensor, never an M x N one. S' is saved for the backward (it is dB's left operand).
  2. cuBLAS: ``y = bias + x W^T`` (``addmm``), then ``y += S' B^T`` (``addmm_``, beta 1).

backward (W and bias are frozen: no gradient for them)
  3. ``_dy_rank_kernel`` (Triton): reads each dy tile once and produces both
     ``dS = s * scaling * (dy B)`` (M x r) and ``dB = dy^T S'`` (N x r). A 2-D grid of row tiles
     x column splits; each program writes float32 partials (of dS over its columns, of dB over
     its rows) that torch sums afterwards (deterministic: no atomics).
  4. cuBLAS: ``dA = dS^T x``; ``dx = dy W``, then ``dx += dS A`` (``addmm_``, beta 1).

Full-size traffic beyond a plain linear's (x, W, y forward; dy, W, dx backward): forward one more
read of x (step 1) and one read + write of y (the rank-r addmm); backward one more read of dy
(step 3), of x (dA) and one read + write of dx. Each is a streaming pass over an M x d tensor;
everything else written (S', dS, the partials) is rank-sized, the dB partials cdiv(M, block) x N x r
float32. There are no full-size temporaries.

On a GPU the two Triton kernels are autotuned; under ``TRITON_INTERPRET=1`` (read when this module
is first imported) each uses one small config so the interpreter does not benchmark. The autotune key
uses the token count rounded up to a power of two, so variable sequence lengths reuse a tuned config.
The interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.9), so under the interpreter bf16
operands are upcast to float32 before each dot; a product of two bf16 values is exact in float32,
so this matches a GPU bf16 MMA with float32 accumulation.

Limits: rank <= MAX_RANK (128); at most 2**31 - 1 rows; all tensors share x's dtype and device
(no mixed-precision weights; cast before calling under autocast).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch
import triton
import triton.language as tl

__all__ = ["fused_lora_linear", "perturbation_scales", "fused_lora_available", "MAX_RANK"]


def _interpret_enabled() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_INTERPRET = _interpret_enabled()

#: Largest LoRA rank the fused kernels accept (the padded rank is a single register tile).
MAX_RANK = 128

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Scalar kernel arguments that change from call to call in training (a fresh seed every step, the
#: sequence length): Triton must not specialise on their value (== 1, divisible by 16), or each new
#: value could compile another variant of every kernel.
_NO_SPECIALIZE = ["seed", "rows_per_draw"]

#: Rows per program of ``_dy_rank_kernel``. Fixed on the host, not autotuned: it sets the number of
#: dB partials the host allocates before the launch. 128 keeps those float32 partials at r/64 of a
#: bf16 dy's bytes (a quarter at rank 16).
_DY_BLOCK_M = 16 if _INTERPRET else 128


# ----------------------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _draw_scales(seed, rows, eps, rows_per_draw, PERTURB: tl.constexpr, PER_ROW: tl.constexpr):
    """Perturb-and-Merge factors (float32) for the int32 row indices ``rows``.

    s = 1 + eps * (k - 1) with k = philox(seed, offset) mod 3, offset = row // rows_per_draw (per
    row) or 0 (per call). The modulo bias of a uint32 is 2**-32, negligible.
    """
    if PERTURB:
        if PER_ROW:
            offsets = rows // rows_per_draw
        else:
            offsets = rows * 0
        k = (tl.randint(seed, offsets) % 3).to(tl.float32)
        s = 1.0 + eps * (k - 1.0)
    else:
        s = (rows * 0).to(tl.float32) + 1.0
    return s


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with a float32 accumulator (operands upcast under the interpreter for bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


# ----------------------------------------------------------------------------------------------------
# Autotune configurations
# ----------------------------------------------------------------------------------------------------


def _proj_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, k, s, w in [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 3, 8), (16, 256, 3, 4)]
    ]


def _dy_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32})]
    return [
        triton.Config({"BLOCK_N": n}, num_stages=s, num_warps=w)
        for n, s, w in [(64, 3, 4), (64, 4, 8), (128, 3, 8), (128, 4, 4), (32, 4, 4), (256, 2, 8)]
    ]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _scales_kernel(
    out_ptr,
    n_rows,
    seed,
    eps,
    rows_per_draw,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = _draw_scales(seed, rows, eps, rows_per_draw, PERTURB, PER_ROW)
    tl.store(out_ptr + rows, s, mask=rows < n_rows)


@triton.autotune(configs=_proj_configs(), key=["M_BUCKET", "K", "BLOCK_R"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _rank_proj_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    M,
    M_BUCKET,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_om,
    stride_or,
    seed,
    eps,
    scaling,
    rows_per_draw,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S' (M x R, out's dtype) = s * scaling * X (M x K) @ A^T (K x R), s regenerated from seed.

    One program per BLOCK_M rows; one pass over X, float32 accumulation, one rounding at the store.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        a = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = _mma(x, a, acc, UPCAST, PREC)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    s = _draw_scales(seed, offs_m, eps, rows_per_draw, PERTURB, PER_ROW) * scaling
    acc = acc * s[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(configs=_dy_configs(), key=["M_BUCKET", "N", "BLOCK_R", "BLOCK_M"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dy_rank_kernel(
    dy_ptr,
    b_ptr,
    sp_ptr,
    ds_ptr,
    db_ptr,
    M,
    M_BUCKET,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_spm,
    stride_spr,
    stride_dss,
    stride_dsm,
    stride_dsr,
    stride_dbt,
    stride_dbn,
    stride_dbr,
    seed,
    eps,
    scaling,
    rows_per_draw,
    WRITE_DB: tl.constexpr,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Both rank-space gradients from one read of dy (M x N):

        ds[split] (M x R)  = s * scaling * dy[:, cols] @ B[cols]    (summed over splits by the host)
        db[tile]  (N x R)  = dy[rows]^T @ S'[rows]                   (summed over row tiles by the host)

    Grid (cdiv(M, BLOCK_M), splits): program (i, j) owns row tile i and the j-th of ``splits``
    contiguous runs of BLOCK_N-column tiles. Each dy tile is loaded once and feeds both MMAs. ds is
    stored in ds's dtype (x's dtype when there is one split: the host then uses it as is).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, tl.num_programs(1))
    n_start = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(n_start + tiles_per_split * BLOCK_N, N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    sp = tl.load(
        sp_ptr + rows[:, None] * stride_spm + offs_r[None, :] * stride_spr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        cols = offs_n.to(tl.int64)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = _mma(dy, b, acc, UPCAST, PREC)
        if WRITE_DB:
            db = _mma(tl.trans(dy), sp, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), UPCAST, PREC)
            db_ptrs = db_ptr + pid_m * stride_dbt + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
            tl.store(db_ptrs, db, mask=mask_n[:, None] & mask_r[None, :])
    s = _draw_scales(seed, offs_m, eps, rows_per_draw, PERTURB, PER_ROW) * scaling
    acc = acc * s[:, None]
    ds_ptrs = ds_ptr + pid_s * stride_dss + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
    tl.store(ds_ptrs, acc.to(ds_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------------------------------
# Host-side launchers
# ----------------------------------------------------------------------------------------------------


def _bucket(m: int) -> int:
    """Autotune key for the token count (unused inside the kernels): the next power of two, so
    variable sequence lengths do not re-run the autotuner for every distinct M."""
    return triton.next_power_of_2(max(m, 1))


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's TF32 switch; half dtypes ignore it."""
    if dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _dy_splits(m: int, n: int, device: torch.device) -> int:
    """Column splits of ``_dy_rank_kernel``: with few row tiles (small M), enough programs to fill
    the GPU (two per SM), each split still >= 256 columns. Under the interpreter: 2 whenever N
    spans more than one 32-column tile, so the tests run both the one-split and the summed path."""
    if _INTERPRET:
        return 2 if n > 32 else 1
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(m, _DY_BLOCK_M)
    return max(1, min(triton.cdiv(2 * sms, row_tiles), triton.cdiv(n, 256)))


def _draw_args(draw: dict) -> tuple:
    return draw["seed"], draw["eps"], draw["scaling"], draw["rows_per_draw"]


def _launch_rank_proj(x2: torch.Tensor, lora_A: torch.Tensor, draw: dict) -> torch.Tensor:
    """S' = s * scaling * x2 (M x K) @ lora_A^T, (M x rank) in x2's dtype."""
    m, k = x2.shape
    rank = lora_A.shape[0]
    out = torch.empty((m, rank), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _rank_proj_kernel[grid](
        x2,
        lora_A,
        out,
        m,
        _bucket(m),
        k,
        rank,
        x2.stride(0),
        x2.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        out.stride(0),
        out.stride(1),
        *_draw_args(draw),
        PERTURB=draw["eps"] > 0.0,
        PER_ROW=draw["per_row"],
        UPCAST=_upcast(x2.dtype),
        PREC=_precision(x2.dtype),
        BLOCK_R=_block_r(rank),
    )
    return out


def _launch_dy_rank(
    dy2: torch.Tensor, lora_B: torch.Tensor, sp: torch.Tensor, draw: dict, need_db: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dS in dy2's dtype (M x rank), dB in float32 (N x rank) or None) from one read of dy2."""
    m, n = dy2.shape
    rank = lora_B.shape[1]
    row_tiles = triton.cdiv(m, _DY_BLOCK_M)
    splits = _dy_splits(m, n, dy2.device)
    # One split: the kernel writes dS itself, scaled and rounded; several: float32 partials.
    ds = torch.empty((splits, m, rank), device=dy2.device, dtype=dy2.dtype if splits == 1 else torch.float32)
    db = torch.empty((row_tiles, n, rank), device=dy2.device, dtype=torch.float32) if need_db else ds
    _dy_rank_kernel[(row_tiles, splits)](
        dy2,
        lora_B,
        sp,
        ds,
        db,
        m,
        _bucket(m),
        n,
        rank,
        dy2.stride(0),
        dy2.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        sp.stride(0),
        sp.stride(1),
        ds.stride(0),
        ds.stride(1),
        ds.stride(2),
        db.stride(0),
        db.stride(1),
        db.stride(2),
        *_draw_args(draw),
        WRITE_DB=need_db,
        PERTURB=draw["eps"] > 0.0,
        PER_ROW=draw["per_row"],
        UPCAST=_upcast(dy2.dtype),
        PREC=_precision(dy2.dtype),
        BLOCK_R=_block_r(rank),
        BLOCK_M=_DY_BLOCK_M,
    )
    d_s = ds[0] if splits == 1 else ds.sum(0).to(dy2.dtype)
    d_b = None
    if need_db:
        d_b = db[0] if row_tiles == 1 else db.sum(0)
    return d_s, d_b


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


def _on_device(t: torch.Tensor):
    """Launch on t's GPU even when it is not the current device; the torch products run in t's
    dtype whatever autocast says (fused_lora_linear's inputs already share one dtype)."""
    stack = contextlib.ExitStack()
    if t.is_cuda:
        stack.enter_context(torch.cuda.device(t.device))
    stack.enter_context(torch.autocast(t.device.type, enabled=False))
    return stack


class _FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, eps, seed, per_row, rows_per_draw):
        with _on_device(x):
            return _FusedLoRALinear._forward(
                ctx, x, weight, bias, lora_A, lora_B, scaling, eps, seed, per_row, rows_per_draw
            )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with _on_device(dy):
            return _FusedLoRALinear._backward(ctx, dy)

    @staticmethod
    def _forward(ctx, x, weight, bias, lora_A, lora_B, scaling, eps, seed, per_row, rows_per_draw):
        in_features = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        n = lora_B.shape[0]
        draw = dict(seed=seed, eps=eps, scaling=scaling, per_row=per_row, rows_per_draw=rows_per_draw)

        sp = _launch_rank_proj(x2, lora_A, draw)  # S' = s * scaling * x A^T, (M, r)
        if bias is not None:
            y = torch.addmm(bias, x2, weight.t())
        else:
            y = torch.mm(x2, weight.t())
        y.addmm_(sp, lora_B.t())

        ctx.save_for_backward(x2, sp, weight, lora_A, lora_B)
        ctx.draw = draw
        ctx.x_shape = x.shape
        return y.reshape(*lead, n)

    @staticmethod
    def _backward(ctx, dy):
        x2, sp, weight, lora_A, lora_B = ctx.saved_tensors
        draw = ctx.draw
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        m, k = x2.shape
        n, rank = lora_B.shape
        dy2 = dy.reshape(-1, n)
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        if not dy2.is_contiguous():
            dy2 = dy2.contiguous()

        dx = d_a = d_b = None
        if m == 0 or n == 0:
            if need_x:
                dx = torch.zeros(ctx.x_shape, device=x2.device, dtype=x2.dtype)
            if need_a:
                d_a = torch.zeros_like(lora_A)
            if need_b:
                d_b = torch.zeros_like(lora_B)
            return dx, None, None, d_a, d_b, None, None, None, None, None

        d_s, d_b32 = _launch_dy_rank(dy2, lora_B, sp, draw, need_b)
        if need_x:
            dx2 = torch.mm(dy2, weight)
            dx2.addmm_(d_s, lora_A)
            dx = dx2.reshape(ctx.x_shape)
        if need_a:
            d_a = torch.mm(d_s.t(), x2)
        if need_b:
            d_b = d_b32.to(lora_B.dtype)
        return dx, None, None, d_a, d_b, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def fused_lora_available(device: torch.device | str | torch.Tensor | None = None) -> bool:
    """True when the fused kernels can run on ``device``: a CUDA device (Triton imported), or any
    device when ``TRITON_INTERPRET=1`` was set before this module was imported."""
    if _INTERPRET:
        return True
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed: expected a non-negative int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected 0 <= seed < 2**63, got {seed}")
    return seed


def _check_rows_per_draw(rows_per_draw) -> int:
    if isinstance(rows_per_draw, bool) or not isinstance(rows_per_draw, numbers.Integral):
        raise ValueError(f"rows_per_draw: expected a positive int, got {type(rows_per_draw).__name__}")
    rows_per_draw = int(rows_per_draw)
    if not 1 <= rows_per_draw < 2**31:
        raise ValueError(f"rows_per_draw: expected 1 <= rows_per_draw < 2**31, got {rows_per_draw}")
    return rows_per_draw


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps: expected a float in [0, 1), got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 <= eps < 1.0):  # also rejects NaN
        raise ValueError(f"eps: expected a float in [0, 1), got {eps}")
    return eps


def perturbation_scales(
    seed: int,
    n_rows: int,
    eps: float,
    per_row: bool = False,
    device: torch.device | str = "cuda",
    rows_per_draw: int = 1,
) -> torch.Tensor:
    """The factors s the fused kernels draw for ``seed``: a float32 tensor of shape ``(n_rows,)``.

    Runs the same Philox draw as the kernels in a tiny Triton kernel. With ``per_row=False`` all
    ``n_rows`` entries hold the one per-call draw; with ``per_row=True`` row ``r`` holds draw
    ``r // rows_per_draw`` (so ``perturbation_scales(seed, B, eps, per_row=True)`` are the B
    per-sample factors of a call with ``per_row=True, rows_per_draw=S`` on x of shape (B, S, in)).
    """
    seed = _check_seed(seed)
    eps = _check_eps(eps)
    rows_per_draw = _check_rows_per_draw(rows_per_draw)
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral) or n_rows < 0:
        raise ValueError(f"n_rows: expected a non-negative int, got {n_rows!r}")
    n_rows = int(n_rows)
    if n_rows >= 2**31:
        raise ValueError(f"n_rows: at most 2**31 - 1 rows, got {n_rows}")
    out = torch.empty(n_rows, device=device, dtype=torch.float32)
    if n_rows == 0:
        return out
    block = 1024
    _scales_kernel[(triton.cdiv(n_rows, block),)](
        out, n_rows, seed, eps, rows_per_draw, PERTURB=eps > 0.0, PER_ROW=bool(per_row), BLOCK=block
    )
    return out


def _validate(x, weight, bias, lora_A, lora_B, scaling):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    in_features = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(
            f"weight: expected shape (out_features, {in_features}) to match x (..., {in_features}), "
            f"got {tuple(weight.shape)}"
        )
    out_features = weight.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected shape (rank, {in_features}), got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError("lora_A: rank 0 (lora_A has no rows); use a plain linear instead")
    if rank > MAX_RANK:
        raise ValueError(f"lora_A: rank {rank} is above the fused kernel's maximum {MAX_RANK}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B: expected shape ({out_features}, {rank}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, x is on {x.device}")
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(f"x: on device {x.device}; the fused kernels need CUDA (or TRITON_INTERPRET=1)")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name}: requires_grad is set, but the fused kernel treats it as frozen")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
    rows = math.prod(x.shape[:-1])
    if rows >= 2**31:
        raise ValueError(f"x: at most 2**31 - 1 rows, got {rows}")


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    eps: float = 0.0,
    seed: int = 0,
    per_row: bool = False,
    rows_per_draw: int = 1,
) -> torch.Tensor:
    """``x W^T + bias + s * scaling * (x A^T) B^T`` with s drawn in-kernel from ``seed``.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r);
    all of one dtype (float32, bfloat16 or float16; accumulation is float32). Returns y (..., out)
    in x's dtype. s is in {1 - eps, 1, 1 + eps} with probability 1/3 each, one draw per call or,
    with ``per_row=True``, one per ``rows_per_draw`` consecutive rows of x flattened to (rows, in):
    row r uses draw r // rows_per_draw, so ``rows_per_draw=S`` on x of shape (B, S, in) gives one s
    per sample (``rows_per_draw`` is ignored when ``per_row=False``). ``eps=0`` is plain LoRA.
    Gradients flow to x, lora_A and lora_B; weight and bias are frozen (ValueError if they
    require grad while autograd is recording). Raises ValueError naming the offending argument.
    """
    _validate(x, weight, bias, lora_A, lora_B, scaling)
    eps = _check_eps(eps)
    seed = _check_seed(seed)
    rows_per_draw = _check_rows_per_draw(rows_per_draw)
    weight = weight.contiguous()
    lora_A = lora_A.contiguous()
    lora_B = lora_B.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return _FusedLoRALinear.apply(
        x, weight, bias, lora_A, lora_B, float(scaling), eps, seed, bool(per_row), rows_per_draw
    )
