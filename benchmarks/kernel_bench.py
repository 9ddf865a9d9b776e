"""Benchmark: fused LoRA + Perturb-and-Merge kernel vs PEFT's LoRA Linear vs a plain nn.Linear.

Each measurement is one training step of one layer: forward, then backward to x (and to the LoRA
factors for the two LoRA variants); the base weight is frozen in all three.

  plain  nn.Linear(d, d, bias) with a frozen weight; gradient to x only
  peft   peft.tuners.lora.Linear wrapping that nn.Linear; the Perturb-and-Merge factor s is drawn
         with torch.randint each step and multiplied onto lora_B's output (forward hook)
  fused  pmserve.kernels.fused_lora_linear (cuBLAS base products, s drawn in the Triton rank-space
         kernels from a per-step seed)
  *_graph  (``--graphs``) plain and fused captured once in a CUDA graph and replayed: launch overhead
         gone. The fused graph replays the seed it was captured with, so it times the step, not
         training (a graphed training step would need the seed in device memory).

Reports the median time (CUDA events), achieved TFLOP/s (useful FLOPs of each variant), achieved
GB/s against a minimum-traffic model (every operand read once and every output written once per
pass) and the ratios against plain and PEFT; issue 39's target is fused <= 1.2x plain at d 4096,
rank 16, bf16, 4k and 16k tokens. Needs a CUDA GPU; without one it prints a line and exits 0.
``--interpret`` instead runs a tiny correctness smoke check through Triton's interpreter on the CPU;
``--dry-run`` runs the whole timing path (the same variants, ratios and JSON) on the CPU under the
interpreter with tiny shapes, so benchmarks/gpu_check.sh can be tried without a GPU (its times
mean nothing).

    python benchmarks/kernel_bench.py                      # default grid, bf16
    python benchmarks/kernel_bench.py --tokens 4096 --d 4096 --rank 16 --graphs --json out.json
    python benchmarks/kernel_bench.py --interpret          # CPU smoke check
    python benchmarks/kernel_bench.py --dry-run --json out.json   # CPU run of the timing path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="rows of x (batch * seq)")
    p.add_argument("--d", type=int, nargs="+", default=[768, 4096], help="in = out features")
    p.add_argument("--rank", type=int, nargs="+", default=[8, 16, 64], help="LoRA ranks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--eps", type=float, default=0.1, help="Perturb-and-Merge eps")
    p.add_argument("--per-row", action="store_true", help="one draw per row instead of one per step")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (also triggers Triton autotune)")
    p.add_argument("--iters", type=int, default=50, help="timed steps; the median is reported")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument(
        "--graphs", action="store_true", help="also time plain and fused replayed from a CUDA graph"
    )
    p.add_argument("--interpret", action="store_true", help="tiny CPU smoke check via TRITON_INTERPRET=1")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="the timing path on the CPU under TRITON_INTERPRET=1 with tiny shapes (times are meaningless)",
    )
    args = p.parse_args(argv)
    if args.dry_run:  # tiny shapes unless given; a ragged token count and a rank that is not a power of 2
        given = set(argv if argv is not None else sys.argv[1:])
        if "--tokens" not in given:
            args.tokens = [37]
        if "--d" not in given:
            args.d = [48]
        if "--rank" not in given:
            args.rank = [5]
        if "--warmup" not in given:
            args.warmup = 1
        if "--iters" not in given:
            args.iters = 2
    return args


def _flops(t: int, d_in: int, d_out: int, r: int, lora: bool) -> float:
    base = 2 * t * d_in * d_out * 2  # y = x W^T and dx = dy W
    if not lora:
        return float(base)
    # forward x A^T, (xA^T) B^T; backward dy B, (dy B) A, dA, dB
    return float(base + 2 * t * r * (d_in + d_out) * 3)


def _bytes(t: int, d_in: int, d_out: int, r: int, lora: bool, elt: int) -> float:
    fwd = t * d_in + d_in * d_out + t * d_out + d_out  # x, W, y, bias
    bwd = t * d_out + d_in * d_out + t * d_in  # dy, W, dx
    if lora:
        fwd += 2 * r * (d_in + d_out)  # A, B (read); xa is rank-sized
        bwd += t * d_in + 2 * r * (d_in + d_out)  # x again for dA; A, B read, dA, dB written
    return float((fwd + bwd) * elt)


def _time(step, warmup: int, iters: int, device) -> float:
    """Median milliseconds of ``step`` after ``warmup`` untimed calls: CUDA events on a GPU, the
    wall clock on the CPU (dry run)."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    if device.type != "cuda":
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graphed(step, device):
    """``step`` captured once in a CUDA graph; returns its replay. Warm-up (Triton autotuning
    included) runs on a side stream first, as capture requires."""
    import torch

    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _build(t, d, r, dtype, device, bias, eps, per_row):
    """The three variants as zero-argument step functions, plus a check of fused vs PEFT at eps=0."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from pmserve.kernels import fused_lora_linear

    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, bias=bias, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(False)
    alpha = 2 * r
    peft_layer = LoraLinear(
        base, "default", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0), r=r, lora_alpha=alpha
    )
    peft_layer.to(device=device, dtype=dtype)
    lora_a = peft_layer.lora_A["default"].weight
    lora_b = peft_layer.lora_B["default"].weight
    with torch.no_grad():  # PEFT initialises B to zero; give it values so the check means something
        lora_b.normal_(0.0, 0.02)
    scaling = peft_layer.scaling["default"]

    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, d, device=device, dtype=dtype)
    s_shape = (t, 1) if per_row else (1,)
    levels = torch.tensor([1.0 - eps, 1.0, 1.0 + eps], device=device, dtype=dtype)
    state = {"s": None, "step": 0}

    def hook(_mod, _inp, out):
        return out * state["s"] if state["s"] is not None else out

    peft_layer.lora_B["default"].register_forward_hook(hook)

    def plain():
        y = base(x)
        torch.autograd.grad(y, [x], dy)

    def peft_step():
        state["s"] = levels[torch.randint(0, 3, s_shape, device=device)]
        y = peft_layer(x)
        torch.autograd.grad(y, [x, lora_a, lora_b], dy)

    def fused():
        state["step"] += 1
        y = fused_lora_linear(
            x, base.weight, base.bias, lora_a, lora_b, scaling, eps=eps, seed=state["step"], per_row=per_row
        )
        torch.autograd.grad(y, [x, lora_a, lora_b], dy)

    # Correctness at eps = 0 (no perturbation): fused vs PEFT, forward and all three gradients.
    state["s"] = None
    y_p = peft_layer(x)
    g_p = torch.autograd.grad(y_p, [x, lora_a, lora_b], dy)
    y_f = fused_lora_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, eps=0.0, seed=0)
    g_f = torch.autograd.grad(y_f, [x, lora_a, lora_b], dy)
    err = 0.0
    for a, b in zip((y_f, *g_f), (y_p, *g_p), strict=True):
        err = max(err, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item())

    def fused_fixed_seed():  # for the CUDA graph: a captured seed is replayed as it was
        y = fused_lora_linear(
            x, base.weight, base.bias, lora_a, lora_b, scaling, eps=eps, seed=12345, per_row=per_row
        )
        torch.autograd.grad(y, [x, lora_a, lora_b], dy)

    steps = {"plain": plain, "peft": peft_step, "fused": fused}
    return steps, {"plain": plain, "fused": fused_fixed_seed}, err


def _interpret_smoke() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from pmserve.kernels import fused_lora_linear, lora_linear_reference, perturbation_scales

    t0 = time.perf_counter()
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for t, d, r, per_row in ((37, 48, 8, True), (16, 40, 4, False)):
            torch.manual_seed(0)
            x = torch.randn(t, d, dtype=dtype, requires_grad=True)
            w = (torch.randn(d, d) / d**0.5).to(dtype)
            a = (torch.randn(r, d) / d**0.5).to(dtype).requires_grad_()
            b = (torch.randn(d, r) / r**0.5).to(dtype).requires_grad_()
            dy = torch.randn(t, d, dtype=dtype)
            y = fused_lora_linear(x, w, None, a, b, 2.0, eps=0.3, seed=5, per_row=per_row)
            got = (y, *torch.autograd.grad(y, [x, a, b], dy))
            s = perturbation_scales(5, t, 0.3, per_row=per_row, device="cpu")
            xr, ar, br = (v.detach().float().requires_grad_() for v in (x, a, b))
            yr = lora_linear_reference(xr, w.float(), None, ar, br, 2.0, s)
            ref = (yr, *torch.autograd.grad(yr, [xr, ar, br], dy.float()))
            for g, e in zip(got, ref, strict=True):
                worst = max(worst, ((g.float() - e).abs().max() / e.abs().max().clamp_min(1e-6)).item())
    ok = worst < 3e-2
    print(
        f"interpreter smoke check: worst relative error {worst:.2e} ({'ok' if ok else 'FAILED'}), "
        f"{time.perf_counter() - t0:.1f}s; timings under the interpreter are meaningless, run on a GPU"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.interpret:
        return _interpret_smoke()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

    import torch

    if args.dry_run:
        device = torch.device("cpu")
        name = "cpu (dry run: Triton interpreter, times meaningless)"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    else:
        print(
            "kernel_bench: a CUDA GPU is needed for timings (use --interpret for a CPU smoke check, "
            "--dry-run for a CPU run of the timing path); skipping."
        )
        return 0

    dtype = getattr(torch, DTYPES[args.dtype])
    elt = torch.empty((), dtype=dtype).element_size()
    rows = []
    header = (
        f"{'tokens':>6} {'d':>5} {'r':>3} | {'plain ms':>8} {'peft ms':>8} {'fused ms':>8} | "
        f"{'plain TF':>8} {'peft TF':>8} {'fused TF':>8} | {'peft GB/s':>9} {'fused GB/s':>10} | "
        f"{'peft/pl':>7} {'fused/pl':>8} {'fused/peft':>10} | {'err@eps0':>8}"
    )
    print(
        f"# {name}, {args.dtype}, eps={args.eps}, "
        f"{'per-row' if args.per_row else 'per-step'} draws, median of {args.iters}"
    )
    print(header)
    print("-" * len(header))
    for t in args.tokens:
        for d in args.d:
            for r in args.rank:
                steps, graph_steps, err = _build(
                    t, d, r, dtype, device, not args.no_bias, args.eps, args.per_row
                )
                ms = {k: _time(f, args.warmup, args.iters, device) for k, f in steps.items()}
                graphs: dict[str, float | str] = {}
                if args.graphs:
                    for k, f in graph_steps.items():
                        try:
                            graphs[f"{k}_graph_ms"] = _time(
                                _graphed(f, device), args.warmup, args.iters, device
                            )
                        except Exception as exc:  # recorded, not fatal: the other figures still count
                            graphs[f"{k}_graph_ms"] = f"failed: {type(exc).__name__}: {exc}"[:300]
                fl = {
                    "plain": _flops(t, d, d, r, False),
                    "peft": _flops(t, d, d, r, True),
                    "fused": _flops(t, d, d, r, True),
                }
                by = {
                    "plain": _bytes(t, d, d, r, False, elt),
                    "peft": _bytes(t, d, d, r, True, elt),
                    "fused": _bytes(t, d, d, r, True, elt),
                }
                row = {
                    "tokens": t,
                    "d": d,
                    "rank": r,
                    "dtype": args.dtype,
                    "eps": args.eps,
                    "per_row": args.per_row,
                    "max_rel_err_vs_peft_eps0": err,
                }
                for k in ms:
                    row[f"{k}_ms"] = ms[k]
                    row[f"{k}_tflops"] = fl[k] / (ms[k] * 1e-3) / 1e12
                    row[f"{k}_gbps"] = by[k] / (ms[k] * 1e-3) / 1e9
                row["peft_over_plain"] = ms["peft"] / ms["plain"]
                row["fused_over_plain"] = ms["fused"] / ms["plain"]
                row["fused_over_peft"] = ms["fused"] / ms["peft"]
                row.update(graphs)
                if all(isinstance(graphs.get(f"{k}_graph_ms"), float) for k in ("plain", "fused")):
                    row["fused_graph_over_plain_graph"] = graphs["fused_graph_ms"] / graphs["plain_graph_ms"]
                rows.append(row)
                print(
                    f"{t:>6} {d:>5} {r:>3} | {ms['plain']:>8.3f} {ms['peft']:>8.3f} {ms['fused']:>8.3f} | "
                    f"{row['plain_tflops']:>8.1f} {row['peft_tflops']:>8.1f} {row['fused_tflops']:>8.1f} | "
                    f"{row['peft_gbps']:>9.0f} {row['fused_gbps']:>10.0f} | {row['peft_over_plain']:>7.2f} "
                    f"{row['fused_over_plain']:>8.2f} {row['fused_over_peft']:>10.2f} | {err:>8.1e}",
                    flush=True,
                )
                if graphs:
                    print(
                        "       CUDA graphs: "
                        + ", ".join(
                            f"{k} {v if isinstance(v, str) else f'{v:.3f}'}" for k, v in graphs.items()
                        )
                    )
                del steps, graph_steps
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        meta = {"device": name, "torch": torch.__version__, "dry_run": args.dry_run}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
