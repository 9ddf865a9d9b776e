"""How far fp32 inference is from the machine's limit (issue 18): ONNX Runtime and PyTorch eager against sgemm.

    python benchmarks/experiments/ort_roofline.py BUNDLE HF_FOLDER [--batch 8] [--seq 64] [--threads 2] [--rounds 6]

Issue 18 asks for a bundle at <= 0.5x PyTorch eager's latency at batch 8. Both run the same floating-point
work, so the ratio is bounded by how close each gets to the machine's matrix-multiply rate. This measures:

- the encoder's floating-point work at (batch, seq), counted from its config (the linear layers and the two
  attention products; softmax, layer norms and GELU are not counted, a few percent);
- PyTorch's fp32 matmul rate for the encoder's own linear shapes (its BLAS), at the same thread count: eager
  cannot beat the work at that rate, and ONNX Runtime's rate on the whole model says how its own GEMMs (MLAS)
  compare;
- the bundle's model.onnx in an ONNX Runtime session (the bundle's own session options), `run` alone on
  fixed token ids (no tokenizer);
- the HF folder in PyTorch eager (fp32, inference mode), forward alone, and where its time goes (PyTorch's
  profiler: the linear layers against everything else).

Every timing is the median over --rounds blocks of 10 calls per backend, the backends alternated block by
block. Prints one JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (not the repository root)
from harness import blocks  # noqa: E402


def flops(cfg, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of one forward: the layers' linear maps and attention's QK^T and PV."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    tokens = batch * seq
    linear = tokens * (4 * h * h + 2 * h * inter)
    attention = batch * 2 * seq * seq * h
    return 2.0 * layers * (linear + attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("hf_folder", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of 10 timed calls per backend")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig, AutoModel

    from pmserve.predict import ort_session

    cfg = AutoConfig.from_pretrained(args.hf_folder)
    work = flops(cfg, args.batch, args.seq)
    tokens = args.batch * args.seq
    h, inter = cfg.hidden_size, cfg.intermediate_size

    # PyTorch's sgemm on the encoder's own linear shapes, one of each
    shapes = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, inter), (tokens, inter, h)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    for a, b in mats:
        a @ b

    ids = (
        np.random.default_rng(0).integers(1000, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int64)
    )
    mask = np.ones_like(ids)
    sess = ort_session(args.bundle / "model.onnx", threads=args.threads)
    names = {i.name for i in sess.get_inputs()}
    feed = {
        k: v
        for k, v in {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}.items()
        if k in names
    }
    model = AutoModel.from_pretrained(args.hf_folder).eval()
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def eager():
        with torch.inference_mode():
            model(input_ids=t_ids, attention_mask=t_mask)

    def ort():
        sess.run(None, feed)

    def gemms():
        for a, b in mats:
            a @ b

    med = {
        k: statistics.median(v)
        for k, v in blocks({"ort": ort, "eager": eager, "gemms": gemms}, args.rounds).items()
    }
    gemm_flops = sum(2.0 * m * k * n for m, k, n in shapes)
    rate = gemm_flops / med["gemms"]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eager()
    averages = prof.key_averages()
    linear = sum(ev.cpu_time_total for ev in averages if ev.key == "aten::linear")
    total = sum(ev.self_cpu_time_total for ev in averages)

    out = {
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "rounds": args.rounds,
        "gflop": work / 1e9,
        "torch_sgemm_gflops": rate / 1e9,
        "torch_sgemm_ms": work / rate * 1e3,
        "ort_ms": med["ort"] * 1e3,
        "eager_ms": med["eager"] * 1e3,
        "ort_gflops": work / med["ort"] / 1e9,
        "eager_gflops": work / med["eager"] / 1e9,
        "ort_over_eager": med["ort"] / med["eager"],
        "torch_sgemm_over_eager": work / rate / med["eager"],
        "eager_linear_share": linear / total if total else None,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
