"""Load benchmark of `pmserve serve` on loopback: throughput and p50 / p99 latency by --max-batch and concurrency.

    python benchmarks/serve_bench.py --bundle BUNDLE [--inputs glosses,words] [--batches 1,8,32]
                                     [--concurrency 1,8,32] [--requests 300] [--seconds 15] [--max-wait-ms 5]

BUNDLE is the `pmserve export` of a builtin:minilm run. For each --max-batch a server process starts on
127.0.0.1; for each input set and concurrency C, C closed-loop clients (asyncio, raw keep-alive sockets) send single-text v2
infer requests until --requests answers or --seconds have passed, after a short warm-up. Input sets from the
built-in task data: WordNet glosses (long, varied lengths: a batch pads to its longest) and their headwords
(short queries, where per-call overhead dominates). The server's /metrics gives the mean batch it formed.
Bounded: at most sets x batches x concurrencies x --seconds of load, plus server starts. Target (issue 9): at
concurrency 32, batching gives at least 3x the throughput of --max-batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from harness import clean_env, free_port, machine, provenance, stop, wait_ready, write_json


def start_server(
    bundle: Path, max_batch: int, max_wait_ms: float, threads: int
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pmserve", "serve", str(bundle), "--name", "m", "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=clean_env())
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}")


def batch_stats(url: str) -> tuple[float, float]:
    """(batches, inputs) so far, from the server's batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    fam = next(
        f
        for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        if f.name == "pmserve_batch_size"
    )
    get = {s.name.rsplit("_", 1)[-1]: s.value for s in fam.samples if not s.name.endswith("_bucket")}
    return get.get("count", 0.0), get.get("sum", 0.0)


def infer_request(text: str) -> bytes:
    """One v2 infer request for one text, as raw HTTP/1.1 bytes (keep-alive)."""
    body = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    ).encode()
    head = "POST /v2/models/m/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def load(url: str, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """C closed-loop clients, each on its own keep-alive connection; each request is one text.

    The clients write pre-encoded requests on raw sockets and read just the status line and the body length:
    on a 2-core machine shared with the server, an HTTP client library's own CPU time would cap what is
    measured (httpx's did, at about 250 requests/s).
    """
    host, port = url.removeprefix("http://").split(":")
    reqs = [infer_request(t) for t in texts]
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(k: int):
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while sent < requests and time.perf_counter() < stop_at:
                req = reqs[(sent + k) % len(reqs)]
                sent += 1
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200"):
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def table(rows: list[dict]) -> str:
    out = [
        "| inputs | --max-batch | concurrency | requests | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['inputs']} | {r['max_batch']} | {r['concurrency']} | {r['requests']} | {r['throughput_rps']} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |"
        )
    return "\n".join(out)


def input_sets(names: list[str]) -> dict[str, list[str]]:
    """glosses: "word: definition; example" (mean about 19 tokens, up to 64), so a batch pads to far more tokens
    than its mean; words: the headword alone (2 to 5 tokens), where per-call overhead dominates."""
    from pmserve.tasks import load_tasks

    glosses = [x for t in load_tasks("builtin:wordnet-nouns", 0) for x in t.test.inputs]
    sets = {"glosses": glosses, "words": [x.split(":")[0] for x in glosses]}
    unknown = [n for n in names if n not in sets]
    if unknown:
        sys.exit(f"--inputs: {unknown[0]!r} is not one of {', '.join(sets)}")
    return {n: sets[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="`pmserve export` of a builtin:minilm run.")
    ap.add_argument("--inputs", default="glosses,words", help="Input sets: glosses, words.")
    ap.add_argument("--batches", default="1,8,32", help="--max-batch values.")
    ap.add_argument("--concurrency", default="1,8,32", help="Concurrent clients.")
    ap.add_argument("--requests", type=int, default=300, help="Most answered requests per cell.")
    ap.add_argument("--seconds", type=float, default=15.0, help="Most seconds of load per cell.")
    ap.add_argument("--warmup", type=int, default=16, help="Untimed requests per cell.")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_bench.json"))
    args = ap.parse_args()

    sets = input_sets(args.inputs.split(","))
    concurrency = [int(x) for x in args.concurrency.split(",")]
    load_before = os.getloadavg()  # other work on the machine shifts every number: record how much there was
    rows = []
    for mb in [int(x) for x in args.batches.split(",")]:
        proc, url = start_server(args.bundle, mb, args.max_wait_ms, args.threads)
        try:
            for name, texts in sets.items():
                for c in concurrency:
                    asyncio.run(load(url, texts[::-1], c, args.warmup, args.seconds))
                    b0, n0 = batch_stats(url)
                    res = asyncio.run(load(url, texts, c, args.requests, args.seconds))
                    b1, n1 = batch_stats(url)
                    mean_batch = round((n1 - n0) / max(b1 - b0, 1), 1)
                    row = {"inputs": name, "max_batch": mb, "concurrency": c, **res, "mean_batch": mean_batch}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            stop(proc)

    def rps(name, mb, c):
        return next(
            r["throughput_rps"]
            for r in rows
            if (r["inputs"], r["max_batch"], r["concurrency"]) == (name, mb, c)
        )

    top_c = max(concurrency)
    batches = sorted({r["max_batch"] for r in rows})
    speedups = {
        name: {f"max_batch_{mb}": round(rps(name, mb, top_c) / rps(name, 1, top_c), 2) for mb in batches}
        for name in sets
        if 1 in batches
    }
    rows.sort(key=lambda r: (list(sets).index(r["inputs"]), r["max_batch"], r["concurrency"]))
    result = {
        **provenance("serve_bench.py"),
        "bundle": str(args.bundle),
        "machine": machine(),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
        "rows": rows,
        f"throughput_vs_max_batch_1_at_concurrency_{top_c}": speedups,
        "target": "at concurrency 32, batching >= 3x the throughput of --max-batch 1",
    }
    write_json(args.out, result)
    print()
    print(table(rows))
    print(f"\nthroughput vs --max-batch 1 at concurrency {top_c}: {speedups}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
