"""Fused LoRA linear with the Perturb-and-Merge factor drawn inside the kernels (Triton).

    y = x W^T + bias + s * scaling * (x A^T) B^T,     s in {1 - eps, 1, 1 + eps}, each with prob. 1/3

``s`` is drawn with Triton's Philox generator (``tl.randint``) from ``seed``: one draw per call
(``per_row=False``, every row uses Philox offset 0) or one per group of ``rows_per_draw``
consecutive rows of ``x`` flattened to ``(M, in)`` (``per_row=True``, row ``m`` uses offset
``m // rows_per_draw``; the default 1 gives one draw per row, and ``rows_per_draw=S`` on x of
shape ``(B, S, in)`` gives one draw per sample, shared by its S tokens). No noise tensor is materialised: the
backward kernels regenerate exactly the same draws from the saved seed. ``eps == 0`` compiles the
draw away and gives plain LoRA.

Pass a different ``seed`` every training step (e.g. the step counter, or ``hash((step, layer))``):
the same seed always gives the same draws. ``seed`` and ``rows_per_draw`` are not specialised on
by Triton, so a new value does not compile new kernels (keep seeds below 2**31: a larger one is
passed as int64, a second signature). ``pmserve.perturb.FusedPerturbation`` routes every LoRA layer
of a PEFT model through these kernels with one seed per training step.

Kernel decomposition (M = tokens, K = in_features, N = out_features, r = rank padded to a power of
two >= 16 as the constexpr ``BLOCK_R``):

forward
  1. ``_proj_kernel``: ``xa = x A^T`` (M x r, float32). One pass over x; xa is tiny and is saved for
     the backward (it is exactly the right operand of dB), so it is never recomputed.
  2. ``_gemm_lowrank_kernel``: tiled ``x W^T`` main loop (fp32 accumulator), then an epilogue that
     loads the xa tile, scales its rows by ``s * scaling`` (s regenerated from the seed), adds
     ``xa_tile B^T`` into the same accumulator with one extra rank-sized MMA, adds the bias and
     stores y once. y (M x N) is written exactly once.

backward (W and bias are frozen: no gradient for them)
  3. ``_proj_kernel``: ``g = s * scaling * (dy B)`` (M x r, float32), one pass over dy.
  4. ``_gemm_lowrank_kernel`` again: ``dx = dy W + g A`` (same fused epilogue, no bias, no draw).
     dx (M x K) is written exactly once.
  5. ``_rowreduce_kernel`` twice, reductions over the token axis split into a few row chunks whose
     float32 partials (splits x {K or N} x r, small) are summed with torch:
     ``dA = g^T x`` and ``dB = scaling * (s dy)^T xa`` (s applied to the rows of xa, not to dy).

The only full-size tensors written are y in the forward and dx in the backward; everything else
written is rank-sized. dy is read by kernels 3, 4 and 5 and x by 1 and 5 (the extra reads are
streaming passes, cheap next to the GEMMs).

On a GPU the three kernels are autotuned; under ``TRITON_INTERPRET=1`` (read when this module is
first imported) each uses one small config so the interpreter does not benchmark. The autotune key
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


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    cfg = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 256, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in cfg
    ]


def _proj_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_stages=s, num_warps=w)
        for m, k, s, w in [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 3, 8), (16, 256, 3, 4)]
    ]


def _rowreduce_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_C": 32, "BLOCK_M": 16})]
    return [
        triton.Config({"BLOCK_C": c, "BLOCK_M": m}, num_stages=s, num_warps=w)
        for c, m, s, w in [
            (64, 64, 4, 4),
            (128, 64, 4, 4),
            (128, 128, 3, 8),
            (256, 64, 3, 8),
            (64, 128, 4, 4),
        ]
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
def _proj_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    M,
    M_BUCKET,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_yk,
    stride_yr,
    stride_om,
    stride_or,
    seed,
    eps,
    scaling,
    rows_per_draw,
    APPLY_S: tl.constexpr,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (M x R, fp32) = [s * scaling] * X (M x K) @ Y (K x R), rows of s regenerated from seed."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    y_ptrs = y_ptr + offs_k[:, None] * stride_yk + offs_r[None, :] * stride_yr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(y_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PREC)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk
    if APPLY_S:
        s = _draw_scales(seed, offs_m, eps, rows_per_draw, PERTURB, PER_ROW) * scaling
        acc = acc * s[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _gemm_lowrank_kernel(
    x_ptr,
    w_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    out_ptr,
    M,
    M_BUCKET,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_om,
    stride_on,
    seed,
    eps,
    scaling,
    rows_per_draw,
    HAS_BIAS: tl.constexpr,
    APPLY_S: tl.constexpr,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M x N) = X (M x K) @ Wm (K x N) + ([s * scaling] * P (M x R)) @ Q (R x N) [+ bias].

    P is float32 and is cast to the operand dtype for the rank-sized MMA of the epilogue, which
    accumulates into the main accumulator (no second M x N accumulator).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Low-rank epilogue: acc += (s * scaling * P_tile) @ Q_tile.
    p = tl.load(
        p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )
    q = tl.load(
        q_ptr + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    if APPLY_S:
        s = _draw_scales(seed, offs_m, eps, rows_per_draw, PERTURB, PER_ROW) * scaling
        p = p * s[:, None]
    acc = _mma(p.to(q.dtype), q, acc, UPCAST, PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_rowreduce_configs(), key=["M_BUCKET", "C", "BLOCK_R"])
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _rowreduce_kernel(
    x_ptr,
    p_ptr,
    out_ptr,
    M,
    M_BUCKET,
    C,
    R,
    stride_xm,
    stride_xc,
    stride_pm,
    stride_pr,
    stride_os,
    stride_oc,
    stride_or,
    seed,
    eps,
    scaling,
    rows_per_draw,
    APPLY_S: tl.constexpr,
    PERTURB: tl.constexpr,
    PER_ROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[split] (C x R, fp32) = X[rows]^T @ ([s * scaling] * P[rows]) over this split's rows.

    Grid: (cdiv(C, BLOCK_C), n_splits). The row axis is cut into n_splits chunks (multiples of
    BLOCK_M); the wrapper sums the partials over the split axis.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows_per_split = tl.cdiv(tl.cdiv(M, n_splits), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_c[None, :] * stride_xc,
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        p = tl.load(
            p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        if APPLY_S:
            s = _draw_scales(seed, offs_m, eps, rows_per_draw, PERTURB, PER_ROW) * scaling
            p = p * s[:, None]
        acc = _mma(tl.trans(xt), p.to(xt.dtype), acc, UPCAST, PREC)
    out_ptrs = out_ptr + pid_s * stride_os + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=mask_c[:, None] & mask_r[None, :])


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


def _num_splits(m: int, c: int, device: torch.device) -> int:
    """Row chunks for the token-axis reductions: enough programs to fill the GPU, >= 256 rows each."""
    if _INTERPRET:
        return max(1, min(2, triton.cdiv(m, 16)))
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(m, 256), triton.cdiv(2 * sms, triton.cdiv(c, 128))))


def _launch_proj(
    x2, y_kr, rank, *, seed=0, eps=0.0, scaling=1.0, apply_s=False, per_row=False, rows_per_draw=1
):
    """fp32 (M x rank) = [s*scaling] * x2 (M x K) @ y_kr (K x rank, any strides)."""
    m, k = x2.shape
    out = torch.empty((m, rank), device=x2.device, dtype=torch.float32)
    if m == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _proj_kernel[grid](
        x2,
        y_kr,
        out,
        m,
        _bucket(m),
        k,
        rank,
        x2.stride(0),
        x2.stride(1),
        y_kr.stride(0),
        y_kr.stride(1),
        out.stride(0),
        out.stride(1),
        seed,
        eps,
        scaling,
        rows_per_draw,
        APPLY_S=apply_s,
        PERTURB=eps > 0.0,
        PER_ROW=per_row,
        UPCAST=_upcast(x2.dtype),
        PREC=_precision(x2.dtype),
        BLOCK_R=_block_r(rank),
    )
    return out


def _launch_gemm(
    x2,
    w_kn,
    p,
    q_rn,
    bias,
    out,
    *,
    seed=0,
    eps=0.0,
    scaling=1.0,
    apply_s=False,
    per_row=False,
    rows_per_draw=1,
):
    """out (M x N) = x2 (M x K) @ w_kn (K x N) + [s*scaling]*p (M x R) @ q_rn (R x N) [+ bias]."""
    m, k = x2.shape
    n = w_kn.shape[1]
    rank = p.shape[1]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemm_lowrank_kernel[grid](
        x2,
        w_kn,
        p,
        q_rn,
        bias if bias is not None else out,
        out,
        m,
        _bucket(m),
        n,
        k,
        rank,
        x2.stride(0),
        x2.stride(1),
        w_kn.stride(0),
        w_kn.stride(1),
        p.stride(0),
        p.stride(1),
        q_rn.stride(0),
        q_rn.stride(1),
        out.stride(0),
        out.stride(1),
        seed,
        eps,
        scaling,
        rows_per_draw,
        HAS_BIAS=bias is not None,
        APPLY_S=apply_s,
        PERTURB=eps > 0.0,
        PER_ROW=per_row,
        UPCAST=_upcast(x2.dtype),
        PREC=_precision(x2.dtype),
        BLOCK_R=_block_r(rank),
    )
    return out


def _launch_rowreduce(x2, p, *, seed=0, eps=0.0, scaling=1.0, apply_s=False, per_row=False, rows_per_draw=1):
    """fp32 (C x R) = x2 (M x C)^T @ ([s*scaling] * p (M x R)), reduced over the M rows."""
    m, c = x2.shape
    rank = p.shape[1]
    splits = _num_splits(m, c, x2.device)
    part = torch.empty((splits, c, rank), device=x2.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), splits)  # noqa: E731
    _rowreduce_kernel[grid](
        x2,
        p,
        part,
        m,
        _bucket(m),
        c,
        rank,
        x2.stride(0),
        x2.stride(1),
        p.stride(0),
        p.stride(1),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        seed,
        eps,
        scaling,
        rows_per_draw,
        APPLY_S=apply_s,
        PERTURB=eps > 0.0,
        PER_ROW=per_row,
        UPCAST=_upcast(x2.dtype),
        PREC=_precision(x2.dtype),
        BLOCK_R=_block_r(rank),
    )
    return part[0] if splits == 1 else part.sum(0)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


def _on_device(t: torch.Tensor):
    """Launch on t's GPU even when it is not the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
        m = x2.shape[0]
        n, rank = lora_B.shape
        draw = dict(seed=seed, eps=eps, scaling=scaling, per_row=per_row, rows_per_draw=rows_per_draw)

        xa = _launch_proj(x2, lora_A.t(), rank)  # (M, r) fp32, unscaled
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
        if m > 0 and n > 0:
            _launch_gemm(x2, weight.t(), xa, lora_B.t(), bias, y, apply_s=True, **draw)

        ctx.save_for_backward(x2, xa, weight, lora_A, lora_B)
        ctx.draw = draw
        ctx.x_shape = x.shape
        return y.reshape(*lead, n)

    @staticmethod
    def _backward(ctx, dy):
        x2, xa, weight, lora_A, lora_B = ctx.saved_tensors
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

        if need_x or need_a:
            # g = s * scaling * (dy B): (M, r) fp32, the gradient w.r.t. xa.
            g = _launch_proj(dy2, lora_B, rank, apply_s=True, **draw)
            if need_x:
                dx2 = torch.empty((m, k), device=x2.device, dtype=x2.dtype)
                _launch_gemm(dy2, weight, g, lora_A, None, dx2)
                dx = dx2.reshape(ctx.x_shape)
            if need_a:
                d_a = _launch_rowreduce(x2, g).t().to(lora_A.dtype).contiguous()
        if need_b:
            d_b = _launch_rowreduce(dy2, xa, apply_s=True, **draw).to(lora_B.dtype)
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
