"""Fused LoRA + Perturb-and-Merge Triton kernels against the PyTorch reference (Triton interpreter).

Not collected by a plain `pytest tests`: tests/test_kernel.py runs this file in a child pytest whose environment
alone has TRITON_INTERPRET=1 (by hand: TRITON_INTERPRET=1 python -m pytest tests/interpreted_kernel.py)."""

from tests.interpreter_subprocess import require_interpreter

require_interpreter(__name__)  # before anything imports triton or pmserve.kernels.fused_lora

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from pmserve.kernels import fused_lora as _fl  # noqa: E402
from pmserve.kernels import (  # noqa: E402
    fused_lora_available,
    fused_lora_linear,
    lora_linear_reference,
    perturbation_scales,
)

if not _fl._INTERPRET:  # never a silent skip: the parent test reports this child's failure
    raise RuntimeError(
        "pmserve.kernels.fused_lora was imported before TRITON_INTERPRET=1 was set; "
        "run this file through tests/test_kernel*.py"
    )

DEV = "cpu"
TOL = {  # (rtol, atol relative to the reference's largest magnitude)
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (4e-2, 2e-2),
}


def _make(lead, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g) / k**0.5
    bb = torch.randn(n, r, generator=g) / r**0.5
    dy = torch.randn(*lead, n, generator=g)
    # Round to the test dtype once so the float32 reference sees exactly the kernel's inputs.
    rnd = [t.to(dtype) if t is not None else None for t in (x, w, b, a, bb, dy)]
    return rnd


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.float(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def _run_both(x, w, b, a, bb, dy, scaling, eps, seed, per_row, rows_per_draw=1):
    """Fused forward/backward and the float32 reference with the kernel's own draws."""
    xf = x.detach().clone().requires_grad_()
    af = a.detach().clone().requires_grad_()
    bf = bb.detach().clone().requires_grad_()
    y = fused_lora_linear(
        xf, w, b, af, bf, scaling, eps=eps, seed=seed, per_row=per_row, rows_per_draw=rows_per_draw
    )
    y.backward(dy)

    rows = x.numel() // x.shape[-1]
    s = perturbation_scales(seed, rows, eps, per_row=per_row, device=DEV, rows_per_draw=rows_per_draw)
    xr = x.detach().float().clone().requires_grad_()
    ar = a.detach().float().clone().requires_grad_()
    br = bb.detach().float().clone().requires_grad_()
    yr = lora_linear_reference(xr, w.float(), None if b is None else b.float(), ar, br, scaling, s)
    yr.backward(dy.float())
    return (y, xf.grad, af.grad, bf.grad), (yr, xr.grad, ar.grad, br.grad), s


CASES = [
    # (lead shape, in, out, rank, dtype, bias, per_row)
    ((1,), 16, 16, 1, torch.float32, True, False),
    ((7,), 24, 40, 4, torch.float32, False, True),
    ((33,), 40, 24, 8, torch.float32, True, True),
    ((33,), 16, 40, 4, torch.float32, True, False),
    ((2, 5), 24, 16, 4, torch.float32, True, True),  # 3-D x
    ((3, 11), 40, 40, 8, torch.float32, False, False),
    ((7,), 24, 40, 4, torch.bfloat16, True, True),
    ((2, 9), 40, 24, 8, torch.bfloat16, True, False),
    ((7,), 24, 40, 4, torch.float16, True, True),
    ((33,), 40, 16, 1, torch.float16, False, False),
    # Ranks that are not powers of two (BLOCK_R 16 and 32), rows not a multiple of the row tile, and
    # out_features over several column tiles (the backward kernel's summed column splits).
    ((37,), 24, 72, 5, torch.float32, True, True),
    ((2, 19), 40, 100, 20, torch.bfloat16, False, True),
    ((37,), 72, 40, 20, torch.float16, True, False),
]


@pytest.mark.parametrize("lead,k,n,r,dtype,bias,per_row", CASES)
def test_matches_reference(lead, k, n, r, dtype, bias, per_row):
    x, w, b, a, bb, dy = _make(lead, k, n, r, dtype, bias=bias, seed=k * n + r)
    got, ref, s = _run_both(x, w, b, a, bb, dy, scaling=2.0, eps=0.5, seed=1234, per_row=per_row)
    assert got[0].dtype == dtype and got[0].shape == (*lead, n)
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    for name, g_, r_ in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        _close(g_, r_, dtype, name)
    if not per_row:
        assert torch.all(s == s[0])


def _draw(seed, eps, scaling, per_row, rows_per_draw):
    return dict(seed=seed, eps=eps, scaling=scaling, per_row=per_row, rows_per_draw=rows_per_draw)


@pytest.mark.parametrize(
    "dtype,per_row,r", [(torch.float32, True, 5), (torch.bfloat16, False, 20), (torch.float16, True, 3)]
)
def test_rank_proj_kernel(dtype, per_row, r):
    """Forward kernel alone: S' = s * scaling * x A^T (M x r, x's dtype), M = 37 not a multiple of its row tile."""
    m, k, seed, eps, scaling, rpd = 37, 40, 77, 0.5, 1.75, 3
    x, _, _, a, _, _ = _make((m,), k, 8, r, dtype)
    got = _fl._launch_rank_proj(x, a, _draw(seed, eps, scaling, per_row, rpd))
    s = perturbation_scales(seed, m, eps, per_row=per_row, device=DEV, rows_per_draw=rpd)
    ref = (x.float() @ a.float().t()) * (s * scaling)[:, None]
    assert got.shape == (m, r) and got.dtype == dtype
    _close(got, ref, dtype, "S'")


@pytest.mark.parametrize(
    "splits,dtype,r,n,need_db",
    [
        (1, torch.float32, 5, 72, True),
        (2, torch.float32, 20, 72, True),
        (3, torch.bfloat16, 5, 40, True),  # 2 column tiles, 3 splits: the last split is empty
        (3, torch.float16, 20, 72, True),
        (2, torch.float32, 5, 72, False),
    ],
)
def test_dy_rank_kernel(monkeypatch, splits, dtype, r, n, need_db):
    """Backward kernel alone, against autograd of y = (s * scaling * S) B^T with S a leaf: dS = dL/dS and
    dB = dL/dB from one read of dy, for every split count (rows 37: ragged against the 16-row tile)."""
    m, seed, eps, scaling, rpd = 37, 5, 0.5, 0.75, 2
    monkeypatch.setattr(_fl, "_dy_splits", lambda *_: splits)
    g = torch.Generator().manual_seed(r * n)
    s_leaf = torch.randn(m, r, generator=g).to(dtype).float().requires_grad_()
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    s = perturbation_scales(seed, m, eps, per_row=True, device=DEV, rows_per_draw=rpd)
    bf = b.float().requires_grad_()
    scaled = s_leaf * (s * scaling)[:, None]
    (scaled @ bf.t()).backward(dy.float())

    d_s, d_b = _fl._launch_dy_rank(
        dy, b, scaled.detach().to(dtype), _draw(seed, eps, scaling, True, rpd), need_db
    )
    assert d_s.shape == (m, r) and d_s.dtype == dtype
    _close(d_s, s_leaf.grad, dtype, "dS")
    if need_db:
        assert d_b.shape == (n, r) and d_b.dtype == torch.float32
        _close(d_b, bf.grad, dtype, "dB")
    else:
        assert d_b is None


def test_eps_zero_is_plain_lora():
    x, w, b, a, bb, dy = _make((33,), 40, 24, 8, torch.float32)
    outs = []
    for seed, per_row in ((0, False), (7, True), (99, False)):
        got, ref, s = _run_both(x, w, b, a, bb, dy, scaling=0.5, eps=0.0, seed=seed, per_row=per_row)
        assert torch.all(s == 1.0)
        plain = lora_linear_reference(x, w, b, a, bb, 0.5)  # s = 1: plain LoRA
        _close(got[0], plain, torch.float32, "y")
        for name, g_, r_ in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
            _close(g_, r_, torch.float32, name)
        outs.append(got)
    for other in outs[1:]:  # the draw is compiled away: bit-identical whatever the seed
        for t0, t1 in zip(outs[0], other, strict=True):
            assert torch.equal(t0, t1)


def _recovered_scales(per_row, seed, eps=0.5, m=48):
    """Per-row s read back from the forward output and from dx, with W = 0 so only LoRA remains."""
    k = n = 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g)
    w = torch.zeros(n, k)
    a = torch.randn(1, k, generator=g)
    bb = torch.randn(n, 1, generator=g)
    dy = torch.randn(m, n, generator=g)

    def run(e):
        xx = x.clone().requires_grad_()
        y = fused_lora_linear(xx, w, None, a, bb, 1.5, eps=e, seed=seed, per_row=per_row)
        y.backward(dy)
        return y.detach(), xx.grad

    y_p, dx_p = run(eps)
    y_0, dx_0 = run(0.0)
    s_fwd = (y_p * y_0).sum(1) / (y_0 * y_0).sum(1)
    s_bwd = (dx_p * dx_0).sum(1) / (dx_0 * dx_0).sum(1)
    return s_fwd, s_bwd


@pytest.mark.parametrize("per_row", [True, False])
def test_same_seed_same_draws_forward_and_backward(per_row):
    seed, eps = 2024, 0.5
    s_fwd, s_bwd = _recovered_scales(per_row, seed, eps)
    s_ref = perturbation_scales(seed, s_fwd.numel(), eps, per_row=per_row, device=DEV)
    torch.testing.assert_close(s_fwd, s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_bwd, s_ref, rtol=1e-4, atol=1e-5)
    if per_row:
        assert set(torch.round(s_ref * 4).tolist()) == {2.0, 4.0, 6.0}  # all of {0.5, 1, 1.5} occur
    else:
        assert torch.all(s_ref == s_ref[0])
    # Same seed again: identical draws.
    assert torch.equal(s_ref, perturbation_scales(seed, s_fwd.numel(), eps, per_row=per_row, device=DEV))


def test_different_seeds_give_different_draws():
    a = perturbation_scales(1, 512, 0.3, per_row=True, device=DEV)
    b = perturbation_scales(2, 512, 0.3, per_row=True, device=DEV)
    assert not torch.equal(a, b)
    big = perturbation_scales(2**40 + 3, 512, 0.3, per_row=True, device=DEV)
    assert not torch.equal(a, big) and not torch.equal(b, big)
    per_call = {perturbation_scales(sd, 1, 0.3, device=DEV).item() for sd in range(40)}
    assert len(per_call) == 3
    # And through the fused kernel (per-row draws change the output).
    x, w, b_, a_, bb, _ = _make((33,), 16, 16, 4, torch.float32)
    y1 = fused_lora_linear(x, w, b_, a_, bb, 1.0, eps=0.3, seed=1, per_row=True)
    y2 = fused_lora_linear(x, w, b_, a_, bb, 1.0, eps=0.3, seed=2, per_row=True)
    assert not torch.equal(y1, y2)
    # seed 1 (which Triton would specialise as a constant, were seed not in do_not_specialize).
    s1 = perturbation_scales(1, 33, 0.3, per_row=True, device=DEV)
    ref = lora_linear_reference(x, w, b_, a_, bb, 1.0, s1)
    _close(y1, ref, torch.float32, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_per_draw_one_draw_per_sample(dtype):
    """x (B, S, in) with per_row=True, rows_per_draw=S: one s per sample, shared by its S tokens."""
    bsz, seq, eps, seed = 5, 3, 0.5, 4242
    x, w, b, a, bb, dy = _make((bsz, seq), 24, 16, 4, dtype)
    got, ref, s = _run_both(x, w, b, a, bb, dy, 1.5, eps, seed, per_row=True, rows_per_draw=seq)
    for name, g_, r_ in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        _close(g_, r_, dtype, name)
    per_sample = perturbation_scales(seed, bsz, eps, per_row=True, device=DEV)
    assert torch.equal(s, per_sample.repeat_interleave(seq))
    assert len(set(per_sample.tolist())) > 1  # the samples really do get different draws


def test_rows_per_draw_scales():
    seed, eps = 9, 0.3
    per_draw = perturbation_scales(seed, 4, eps, per_row=True, device=DEV)
    # Row r uses draw r // rows_per_draw, also when the rows do not fill the last group.
    ragged = perturbation_scales(seed, 10, eps, per_row=True, device=DEV, rows_per_draw=3)
    assert torch.equal(ragged, per_draw.repeat_interleave(3)[:10])
    # Ignored per call.
    per_call = perturbation_scales(seed, 10, eps, per_row=False, device=DEV, rows_per_draw=3)
    assert torch.equal(per_call, perturbation_scales(seed, 10, eps, device=DEV))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="^rows_per_draw:"):
            perturbation_scales(seed, 10, eps, per_row=True, device=DEV, rows_per_draw=bad)


def test_draw_frequencies():
    eps = 0.25
    levels = torch.tensor([1 - eps, 1.0, 1 + eps])
    s = perturbation_scales(77, 30000, eps, per_row=True, device=DEV)
    idx = (s[:, None] - levels[None, :]).abs().argmin(1)
    assert torch.allclose(s, levels[idx], atol=1e-6, rtol=0)
    freq = torch.bincount(idx, minlength=3).float() / s.numel()
    assert torch.all((freq - 1 / 3).abs() < 0.02), freq
    # Per-call draws across seeds follow the same law (coarser: fewer samples).
    calls = torch.cat([perturbation_scales(sd, 1, eps, device=DEV) for sd in range(300)])
    cidx = (calls[:, None] - levels[None, :]).abs().argmin(1)
    cfreq = torch.bincount(cidx, minlength=3).float() / calls.numel()
    assert torch.all((cfreq - 1 / 3).abs() < 0.1), cfreq
    const = perturbation_scales(77, 1000, eps, per_row=False, device=DEV)
    assert torch.all(const == const[0])


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 2, 7, 3, generator=g)
    x = base.permute(2, 3, 1, 0)[:, :, 0, :24]  # (7, 3, 24), non-contiguous
    assert not x.is_contiguous()
    w = (torch.randn(24, 16, generator=g) / 5).t()  # (16, 24), non-contiguous
    a = (torch.randn(24, 4, generator=g) / 5).t()  # (4, 24), non-contiguous
    bb = torch.randn(16, 4, generator=g) / 2
    b = torch.randn(32, generator=g)[::2]  # (16,), strided
    dy = torch.randn(7, 3, 16, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
    got, ref, _ = _run_both(x, w, b, a, bb, dy, scaling=1.0, eps=0.4, seed=31, per_row=True)
    for name, g_, r_ in zip(("y", "dx", "dA", "dB"), got, ref, strict=True):
        _close(g_, r_, torch.float32, name)


def test_partial_requires_grad_and_no_grad():
    x, w, b, a, bb, dy = _make((9,), 16, 24, 4, torch.float32)
    af = a.clone().requires_grad_()
    y = fused_lora_linear(x, w, b, af, bb, 1.0, eps=0.2, seed=3)  # only lora_A trains
    y.backward(dy)
    s = perturbation_scales(3, 9, 0.2, device=DEV)
    ar = a.clone().requires_grad_()
    lora_linear_reference(x, w, b, ar, bb, 1.0, s).backward(dy)
    _close(af.grad, ar.grad, torch.float32, "dA")
    with torch.no_grad():  # inference: a weight that requires grad is fine when nothing is recorded
        y2 = fused_lora_linear(x, w.clone().requires_grad_(), b, a, bb, 1.0, eps=0.2, seed=3)
    _close(y2, y.detach(), torch.float32, "y")


def test_empty_rows():
    x, w, b, a, bb, _ = _make((0,), 16, 24, 4, torch.float32)
    xf = x.clone().requires_grad_()
    af = a.clone().requires_grad_()
    y = fused_lora_linear(xf, w, b, af, bb, 1.0, eps=0.1)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert xf.grad.shape == (0, 16) and torch.all(af.grad == 0)


def test_available():
    assert fused_lora_available(torch.device("cpu"))
    assert fused_lora_available(torch.zeros(1))


def _bad_cases():
    x, w, b, a, bb, _ = _make((5,), 16, 24, 4, torch.float32)
    ok = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=1.0)
    yield "weight", dict(ok, weight=torch.randn(24, 17))
    yield "lora_A", dict(ok, lora_A=torch.randn(4, 15))
    yield "lora_B", dict(ok, lora_B=torch.randn(24, 3))
    yield "lora_B", dict(ok, lora_B=torch.randn(23, 4))
    yield "bias", dict(ok, bias=torch.randn(23))
    yield "lora_A", dict(ok, lora_A=torch.randn(0, 16), lora_B=torch.randn(24, 0))  # rank 0
    yield "lora_A", dict(ok, lora_A=torch.randn(200, 16), lora_B=torch.randn(24, 200))  # above MAX_RANK
    yield "weight", dict(ok, weight=w.half())
    yield "lora_B", dict(ok, lora_B=bb.to(torch.bfloat16))
    yield "bias", dict(ok, bias=b.double())
    yield (
        "x",
        dict(ok, x=x.double(), weight=w.double(), bias=b.double(), lora_A=a.double(), lora_B=bb.double()),
    )
    yield "weight", dict(ok, weight=w.clone().requires_grad_())
    yield "eps", dict(ok, eps=-0.1)
    yield "eps", dict(ok, eps=1.0)
    yield "eps", dict(ok, eps=float("nan"))
    yield "seed", dict(ok, seed=-1)
    yield "seed", dict(ok, seed=1.5)
    yield "rows_per_draw", dict(ok, per_row=True, rows_per_draw=0)
    yield "scaling", dict(ok, scaling=float("inf"))


@pytest.mark.parametrize("arg,kwargs", list(_bad_cases()))
def test_validation_errors(arg, kwargs):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        fused_lora_linear(**kwargs)


def test_perturbation_scales_validation():
    with pytest.raises(ValueError, match="eps"):
        perturbation_scales(0, 10, 1.5, device=DEV)
    with pytest.raises(ValueError, match="n_rows"):
        perturbation_scales(0, -1, 0.1, device=DEV)
    assert perturbation_scales(0, 0, 0.1, device=DEV).shape == (0,)
