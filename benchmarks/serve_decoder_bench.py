"""Load benchmark of `pmserve serve` on a decoder bundle: aggregate generated tokens/s and p50 / p99 time to first
token (TTFT) by concurrency.

    python benchmarks/serve_decoder_bench.py --bundle BUNDLE [--concurrency 1,8] [--requests 16]
                                             [--new-tokens 64] [--threads 0] [--disconnects 100] [--json OUT]

One server process on 127.0.0.1 (--max-sequences at the largest concurrency). For each concurrency C, C
closed-loop clients send streamed /v1/completions requests (greedy, `ignore_eos`, exactly --new-tokens tokens
each, prompts of different lengths) until --requests have been answered, after one warm-up request. TTFT is
from sending a request to its first streamed text; tokens/s is all requests' generated tokens over the wall time.
What iteration-level batching should show: C requests share each decode step, so tokens/s grows with C while
TTFT grows only by the prompts that join the batch ahead of one.

--disconnects N: then N streamed requests from 8 clients at once, half of them (drawn by a seeded generator) going
away after 1 to 20 deltas, the rest reading to the end of 8 to 64 tokens, twice over; reported: the sequences
still running after each round (pmserve_active_sequences: must be 0), finished sequences by reason (must add up to
the requests sent), and the server's resident memory after warm-up and after each round (what a slot or a cache
left behind would grow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from harness import clean_env, free_port, machine, provenance, stop, wait_ready, write_json

PROMPTS = [
    "Once upon a time",
    "Write a short poem about the sea and the wind that moves over it at night.",
    "What is the capital of France?",
    "List three uses of a paperclip, one per line, with a short reason for each.",
]


async def one(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> tuple[float, int]:
    """(seconds to the first text, tokens generated) of one streamed request."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


async def load(url: str, concurrency: int, requests: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, PROMPTS[0], 4)  # warm-up
        todo = iter(range(requests))
        ttfts, tokens = [], []

        async def worker():
            for i in todo:
                t, n = await one(client, url, PROMPTS[i % len(PROMPTS)], new_tokens)
                ttfts.append(t)
                tokens.append(n)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": requests,
        "new_tokens": new_tokens,
        "tokens": int(sum(tokens)),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "ttft_p50_ms": round(float(np.percentile(ttfts, 50)) * 1e3, 1),
        "ttft_p99_ms": round(float(np.percentile(ttfts, 99)) * 1e3, 1),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, s.labels.get("reason", "")): s.value
        for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in f.samples
        if s.name in ("pmserve_active_sequences", "pmserve_sequences_finished_total")
    }


async def disconnects(url: str, n: int, seed: int) -> None:
    """N streamed requests, 8 at a time; half leave after a few deltas."""
    rng = np.random.default_rng(seed)
    plans = [(int(rng.integers(8, 65)), bool(rng.random() < 0.5), int(rng.integers(1, 21))) for _ in range(n)]
    gate = asyncio.Semaphore(8)

    async def one_plan(client, i, plan):
        tokens, leave, after = plan
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "ignore_eos": True, "stream": True}
        async with gate, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: {")
                if leave and seen >= after:
                    return  # the client goes away mid-stream

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one_plan(client, i, p) for i, p in enumerate(plans)))


def disconnect_rounds(url: str, pid: int, n: int) -> dict:
    out = {"requests_per_round": n, "rss_mb_after_warmup": round(rss_mb(pid), 1), "rounds": []}
    for k in range(2):
        before = metrics(url)
        asyncio.run(disconnects(url, n, seed=k))
        deadline = time.monotonic() + 60
        while metrics(url).get(("pmserve_active_sequences", ""), 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        after = metrics(url)
        finished = {
            r: after.get(("pmserve_sequences_finished_total", r), 0)
            - before.get(("pmserve_sequences_finished_total", r), 0)
            for r in ("length", "cancelled", "eos", "stop")
        }
        out["rounds"].append(
            {
                "active_after": after.get(("pmserve_active_sequences", ""), 0),
                "finished": finished,
                "rss_mb": round(rss_mb(pid), 1),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--disconnects", type=int, default=0, help="then N streams with random disconnects, twice"
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    port = free_port()
    cmd = [sys.executable, "-m", "pmserve", "serve", str(a.bundle), "--name", "m", "--port", str(port)]
    cmd += [
        "--threads",
        str(a.threads),
        "--max-sequences",
        str(max(levels) + (8 if a.disconnects else 0)),
        "--provider",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=clean_env())
    url = wait_ready(proc, f"http://127.0.0.1:{port}")
    try:
        rows = [asyncio.run(load(url, c, a.requests, a.new_tokens)) for c in levels]
        leaks = disconnect_rounds(url, proc.pid, a.disconnects) if a.disconnects else None
    finally:
        stop(proc)
    out = {
        **provenance("serve_decoder_bench.py"),
        "machine": machine(),
        "bundle": str(a.bundle),
        "rows": rows,
        "disconnects": leaks,
    }
    print("| concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} |")
    if leaks:
        print(json.dumps(leaks, indent=1))
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
