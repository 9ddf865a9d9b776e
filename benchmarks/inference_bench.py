"""Inference benchmark: builtin:minilm merged by P&M, served by ONNX Runtime against PyTorch eager.

    python benchmarks/inference_bench.py --run RUN [--batch 8] [--seq 64] [--runs 40] [--threads 1]
    python benchmarks/inference_bench.py            # trains RUN first: `pmserve train builtin:wordnet-nouns
                                                    # --epochs 1` (about 1.5 min on 2 cores)

Exports the RUN's merged model twice (fp32 with ORT's transformer fusions; int8 dynamic quantisation, whose
accuracy drop on the run's test sets the export measures), checks that the fp32 bundle's accuracy equals the
RUN's final row, and times one shape with pmserve.bench: ONNX Runtime, the merged model in PyTorch eager, the
base model (W_0, same classifier) and the unmerged PEFT model (base + every task's LoRA branch), interleaved in
random order, with the int8 bundle in ONNX Runtime beside them; the same thread count for both runtimes. Targets (issue 5): ORT p50 <= 0.5 x PyTorch p50; merged within 3% of base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pmserve.bench import BenchConfig, run_bench, write_json
from pmserve.export import ExportOptions, export_bundle


def _row(res: dict, backend: str) -> dict:
    return next(r for r in res["results"] if r["backend"] == backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", type=Path, default=None, help="A RUN of builtin:minilm (default: train one in --work)."
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/pmserve-inference-bench"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads for both runtimes (0: PyTorch's default)."
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/inference_bench.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = args.run
    if run is None:
        from pmserve.train import TrainConfig, train

        run = args.work / "run"
        if not (run / "metrics.json").exists():
            print(f"training {run} (builtin:wordnet-nouns, builtin:minilm, 1 epoch per task)")
            train(TrainConfig(data="builtin:wordnet-nouns", epochs=1), run, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())

    bundles, exports = {}, {}
    for name, opts in (("fp32", ExportOptions()), ("int8", ExportOptions(quantize="int8"))):
        out = args.work / f"bundle-{name}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        m = export_bundle(run, out, opts, log=print)
        exports[name] = {
            "seconds": time.perf_counter() - t0,
            "model_mib": m["files"]["model.onnx"]["bytes"] / 2**20,
            "parity": m["parity"],
            "optimization": m["optimization"],
            "quantization": m["quantization"],
        }
        bundles[name] = out
    acc = exports["int8"]["quantization"]["accuracy"]
    final = metrics["by_head"][metrics["head"]]["acc_matrix"][-1]
    fp32_tasks = [t["acc"] for t in acc["fp32"]["tasks"]]
    print(
        f"fp32 bundle accuracy per task {fp32_tasks}; RUN's final row {final}; equal: {fp32_tasks == final}"
    )

    shape = dict(batch_sizes=[args.batch], seq_lens=[args.seq], warmup=args.warmup, runs=args.runs)
    cfg = BenchConfig(**shape, threads=args.threads, other_bundles={"int8": str(bundles["int8"])})
    main_res = run_bench(bundles["fp32"], cfg, log=print)
    ort, eager = _row(main_res, "onnxruntime"), _row(main_res, "torch-merged")
    base, peft = _row(main_res, "torch-base"), _row(main_res, "peft-unmerged")
    q = _row(main_res, "onnxruntime-int8")
    figures = {
        "ort_p50_ms": ort["p50_ms"],
        "torch_eager_p50_ms": eager["p50_ms"],
        "ort_over_torch_p50": ort["p50_ms"] / eager["p50_ms"],
        "torch_base_p50_ms": base["p50_ms"],
        "merged_over_base_p50": eager["p50_ms"] / base["p50_ms"],
        "peft_unmerged_p50_ms": peft["p50_ms"],
        "peft_unmerged_over_merged_p50": peft["p50_ms"] / eager["p50_ms"],
        "ort_int8_p50_ms": q["p50_ms"],
        "int8_accuracy_drop": acc["drop"],
        "fp32_bundle_acc_equals_run": fp32_tasks == final,
    }
    print(json.dumps(figures, indent=2))
    write_json(
        {
            "run": str(run),
            "shape": {"batch": args.batch, "seq": args.seq},
            "figures": figures,
            "exports": exports,
            "bench": main_res,
        },
        args.json,
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
