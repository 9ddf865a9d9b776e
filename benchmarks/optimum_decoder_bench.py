"""pmserve's decoder bundle against Hugging Face Optimum's ORTModelForCausalLM (issue 38), side by side.

    bash benchmarks/optimum_env.sh /tmp/venv-optimum
    python benchmarks/optimum_decoder_bench.py --bundle SMOL_BUNDLE --venv /tmp/venv-optimum [--threads 1]

What a user would do instead: `optimum-cli export onnx --task text-generation-with-past` of the same model folder
(the bundle's source), then ORTModelForCausalLM.generate (greedy, its KV cache, exactly --new-tokens tokens) in
Optimum's own environment, in a worker process that waits while this one runs. pmserve: pmserve.generation over
the bundle (decoder_bench's runner, as `pmserve bench` times it). Every round runs both in a fresh random order;
medians over the rounds. Writes benchmarks/results/optimum_decoder_bench.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, clean_env, write_json

WORKER = r"""
import json, sys, time, torch
import onnxruntime as ort
from optimum.onnxruntime import ORTModelForCausalLM
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[2])
model = ORTModelForCausalLM.from_pretrained(sys.argv[1], session_options=so, provider="CPUExecutionProvider")
class First:
    def __init__(self): self.calls, self.first = 0, None
    def put(self, v):
        self.calls += 1
        if self.calls == 2: self.first = time.perf_counter()
    def end(self): pass
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = torch.tensor(req["prompts"])
    s = First()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["new"], min_new_tokens=req["new"],
                   do_sample=False, streamer=s, pad_token_id=0)
    end = time.perf_counter()
    print(json.dumps([s.first - t0, end - s.first]), flush=True)
"""


def timing_options(ap: argparse.ArgumentParser, work: str) -> None:
    """The options of side_by_side, and the folder the peer's export goes to."""
    ap.add_argument("--work", default=work)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)


def peer(python: str, script: str, *argv):
    """A worker process of a peer's environment running SCRIPT (prints "ready", then answers one JSON line of
    {"prompts", "new"} with [TTFT s, seconds after the first token]); returns (runner, process)."""
    worker = subprocess.Popen(
        [python, "-c", script, *map(str, argv)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd="/tmp",
    )
    while worker.stdout.readline().strip() != "ready":
        pass

    def run(prompts, new):
        worker.stdin.write(json.dumps({"prompts": prompts.tolist(), "new": new}) + "\n")
        worker.stdin.flush()
        return tuple(json.loads(worker.stdout.readline()))

    return run, worker


def side_by_side(runners: dict, vocab: int, args) -> list[dict]:
    """Each runner (prompts [batch, prompt] -> (TTFT s, seconds after the first token)) on the same random
    prompts, in a fresh random order every round; medians over --runs rounds, per batch size."""
    g, order = np.random.default_rng(0), np.random.default_rng(1)
    results = []
    for b in map(int, args.batch_sizes.split(",")):
        prompts = g.integers(100, vocab, (b, args.prompt), dtype=np.int64)
        for r in runners.values():
            r(prompts, 8)
        times = {n: [] for n in runners}
        for _ in range(args.runs):
            for j in order.permutation(len(runners)):
                name = list(runners)[j]
                times[name].append(runners[name](prompts, args.new_tokens))
        for name, ts in times.items():
            results.append(
                {
                    "backend": name,
                    "batch": b,
                    "prompt": args.prompt,
                    "new_tokens": args.new_tokens,
                    "ttft_p50_ms": float(np.median([t[0] for t in ts]) * 1e3),
                    "decode_tokens_s_p50": float(np.median([b * (args.new_tokens - 1) / t[1] for t in ts])),
                    "n": len(ts),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--venv", required=True)
    timing_options(ap, "/tmp/pmserve-optimum-decoder")
    args = ap.parse_args()
    from pmserve.decoder_bench import _OrtRun
    from pmserve.formats.bundle import MODEL, verify_bundle

    manifest = verify_bundle(args.bundle)
    source = manifest["source"]["model"]
    out = Path(args.work) / "optimum"
    py = str(Path(args.venv) / "bin" / "python")
    export_s = None
    if not (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        subprocess.run(
            [
                str(Path(args.venv) / "bin" / "optimum-cli"),
                "export",
                "onnx",
                "--model",
                source,
                "--task",
                "text-generation-with-past",
                str(out),
            ],
            check=True,
            env=clean_env(),
        )
        export_s = time.perf_counter() - t0
    optimum, worker = peer(py, WORKER, out, args.threads)
    runners = {"pmserve": _OrtRun(Path(args.bundle) / MODEL, args.threads), "optimum": optimum}
    results = side_by_side(runners, int(manifest["vocab_size"]), args)
    worker.stdin.close()
    worker.wait()
    write_json(
        RESULTS / "optimum_decoder_bench.json",
        {
            "bundle": args.bundle,
            "source": source,
            "optimum_export_s": export_s,
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "results": results,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
