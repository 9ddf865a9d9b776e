"""pmserve's decoder bundles against ONNX Runtime GenAI (issue 38), side by side on the same weights.

    python -m venv /tmp/venv-genai && /tmp/venv-genai/bin/pip install onnxruntime-genai==0.18.0 \
        "torch==2.13.0+cpu" transformers onnx onnx-ir
    python benchmarks/genai_decoder_bench.py --bundle SMOL_BUNDLE --genai /tmp/venv-genai [--precision int4] \
        [--genai-bundle SMOL_BUNDLE_EXPORTED_WITH_GRAPH_GENAI]

What a user would do instead: ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder -i
HF_FOLDER -p fp32|int4 -e cpu`) on the bundle's source folder, then its Generator (greedy, exactly --new-tokens
tokens: min_length = max_length) in GenAI's own environment (it brings its own onnxruntime), in a worker process
that waits while this one runs. pmserve: pmserve.generation over the bundle, as `pmserve bench` times it. The
timing loop is optimum_decoder_bench's (random prompts, a fresh random order each round, medians). Writes
benchmarks/results/genai_decoder_bench-PRECISION.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, clean_env, write_json
from optimum_decoder_bench import peer, side_by_side, timing_options

WORKER = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
cfg = og.Config(sys.argv[1])
threads = {"intra_op_num_threads": int(sys.argv[2]), "inter_op_num_threads": 1}
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
model = og.Model(cfg)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = np.array(req["prompts"], dtype=np.int32)
    total = ids.shape[1] + req["new"]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=ids.shape[0])
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    first = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    print(json.dumps([first - t0, time.perf_counter() - first]), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--bundle", required=True, help="a pmserve decoder bundle (fp32, or int4 for --precision int4)"
    )
    ap.add_argument("--genai", required=True, help="the virtual environment with onnxruntime-genai")
    ap.add_argument(
        "--genai-bundle",
        help="a pmserve bundle of the same model exported with --graph genai, timed alongside (the builder's "
        "graph driven by pmserve.generation)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    timing_options(ap, "/tmp/pmserve-genai-decoder")
    args = ap.parse_args()
    from pmserve.decoder_bench import _OrtRun
    from pmserve.formats.bundle import MODEL, verify_bundle

    manifest = verify_bundle(args.bundle)
    source = manifest["source"]["model"]
    out = Path(args.work) / args.precision
    py = str(Path(args.genai) / "bin" / "python")
    build_s = None
    if not (out / "genai_config.json").is_file():
        t0 = time.perf_counter()
        cmd = [
            py,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            source,
            "-o",
            str(out),
            "-p",
            args.precision,
        ]
        cmd += ["-e", "cpu", "-c", str(Path(args.work) / "cache")]
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"build-{args.precision}.log", "w") as log:  # its progress bars, kept apart
            subprocess.run(cmd, check=True, env=clean_env(), cwd="/tmp", stdout=log, stderr=subprocess.STDOUT)
        build_s = time.perf_counter() - t0
    genai, worker = peer(py, WORKER, out, args.threads)
    runners = {"pmserve": _OrtRun(Path(args.bundle) / MODEL, args.threads), "genai": genai}
    if args.genai_bundle:
        runners["pmserve-genai-graph"] = _OrtRun(Path(args.genai_bundle) / MODEL, args.threads)
    results = side_by_side(runners, int(manifest["vocab_size"]), args)
    worker.stdin.close()
    worker.wait()
    write_json(
        RESULTS / f"genai_decoder_bench-{args.precision}.json",
        {
            "bundle": args.bundle,
            "genai_bundle": args.genai_bundle,
            "source": source,
            "precision": args.precision,
            "genai_build_s": build_s,
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "results": results,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
