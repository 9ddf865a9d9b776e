"""Version swaps under load: `pmserve serve --repository` answering concurrent clients while versions are loaded.

    python benchmarks/swap_bench.py --repository REPO [--model NAME] [--concurrency 32] [--swaps 10]
                                    [--gap-s 1.5] [--inputs words|glosses] [--max-seconds 110]

REPO holds a model with at least two versions, e.g. two `pmserve export RUN --out REPO/NAME --new-version`. One
server process serves it with `--poll-s 0` (only this script swaps); C closed-loop clients (asyncio, raw
keep-alive sockets, one text per v2 infer request) run throughout, while --swaps loads alternate between the two
newest versions through POST /v2/repository/models/NAME/load, --gap-s apart. Reported: requests answered and
failed (a non-200 answer or a broken connection), p50 / p99 latency overall and for requests in flight during a
load, how many answers each version gave, and each load's time (the load call, which returns once the new version
is verified, opened, probed and swapped in). Bounded: --max-seconds of load at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from harness import clean_env, free_port, machine, stop, wait_ready, write_json
from serve_bench import input_sets


def start_server(repo: Path, threads: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pmserve", "serve", "--repository", str(repo), "--poll-s", "0"]
    cmd += ["--port", str(port), "--threads", str(threads), "--max-wait-ms", str(max_wait_ms)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=clean_env())
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}")


def infer_request(model: str, text: str) -> bytes:
    body = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    ).encode()
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def client(url: str, reqs: list[bytes], k: int, stop: asyncio.Event, out: list) -> None:
    """Closed loop on one keep-alive connection: (sent, done, ok, model_version) per request; a broken connection
    is a failure, and the client reconnects."""
    host, port = url.removeprefix("http://").split(":")
    n = k
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            out.append((time.perf_counter(), time.perf_counter(), False, None))
            await asyncio.sleep(0.05)
            continue
        t0 = time.perf_counter()
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                writer.write(reqs[n % len(reqs)])
                n += 1
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                ok = head.startswith(b"HTTP/1.1 200")
                version = json.loads(body).get("model_version") if ok else None
                out.append((t0, time.perf_counter(), ok, version))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            out.append((t0, time.perf_counter(), False, None))
        finally:
            writer.close()


async def swapper(url: str, model: str, versions: list[str], swaps: int, gap: float, deadline: float) -> list:
    """Alternate loads between the two versions; (start, end, version, status, seconds) per load."""
    loads = []
    async with httpx.AsyncClient(timeout=300) as c:
        for k in range(swaps):
            await asyncio.sleep(gap)
            if time.perf_counter() > deadline:
                break
            version = versions[k % 2]
            t0 = time.perf_counter()
            r = await c.post(
                f"{url}/v2/repository/models/{model}/load", json={"parameters": {"version": version}}
            )
            t1 = time.perf_counter()
            loads.append((t0, t1, version, r.status_code, round(t1 - t0, 3)))
            print(f"load version {version}: {r.status_code} in {t1 - t0:.2f} s", flush=True)
        await asyncio.sleep(gap)  # requests on the last version, after the last swap
    return loads


async def run(url: str, model: str, versions: list[str], texts: list[str], args) -> tuple[list, list, float]:
    reqs = [infer_request(model, t) for t in texts]
    stop = asyncio.Event()
    answers: list = []
    start = time.perf_counter()
    clients = [asyncio.create_task(client(url, reqs, k, stop, answers)) for k in range(args.concurrency)]
    try:
        loads = await swapper(url, model, versions, args.swaps, args.gap_s, start + args.max_seconds)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return answers, loads, time.perf_counter() - start


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def summarise(answers: list, loads: list, wall: float) -> dict:
    ok = [a for a in answers if a[2]]
    windows = [(t0, t1) for t0, t1, *_ in loads]

    def during(a):
        return any(a[0] < t1 and a[1] > t0 for t0, t1 in windows)

    by_done = sorted(ok, key=lambda a: a[1])
    order = [a[3] for a in by_done]
    changes = sum(1 for x, y in zip(order, order[1:]) if x != y)
    lat = [(a[1] - a[0]) * 1000 for a in ok]
    load_s = [s for *_, status, s in loads if status == 200]
    return {
        "requests": len(answers),
        "answered_200": len(ok),
        "failed": len(answers) - len(ok),
        "seconds": round(wall, 1),
        "throughput_rps": round(len(ok) / wall, 1),
        **percentiles(lat),
        "during_loads": {
            "requests": sum(map(during, ok)),
            **percentiles([(a[1] - a[0]) * 1000 for a in ok if during(a)]),
        },
        "outside_loads": {
            "requests": sum(1 for a in ok if not during(a)),
            **percentiles([(a[1] - a[0]) * 1000 for a in ok if not during(a)]),
        },
        "answers_by_version": {v: order.count(v) for v in sorted(set(order))},
        "version_changes_in_answer_order": changes,
        "swaps": len(loads),
        "swaps_ok": len(load_s),
        "load_seconds": load_s,
        "load_seconds_median": round(float(np.median(load_s)), 2) if load_s else None,
        "load_seconds_max": round(max(load_s), 2) if load_s else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repository", type=Path, required=True, help="REPO with a model of at least two versions."
    )
    ap.add_argument("--model", default="", help="Model folder in REPO (default: the only one).")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--gap-s", type=float, default=1.5, help="Seconds between one load's end and the next.")
    ap.add_argument("--inputs", default="words", help="words (headwords) or glosses (WordNet glosses).")
    ap.add_argument("--max-seconds", type=float, default=110.0, help="Most seconds of load.")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/swap_bench.json"))
    args = ap.parse_args()

    texts = input_sets([args.inputs])[args.inputs]
    load_before = os.getloadavg()
    proc, url = start_server(args.repository, args.threads, args.max_wait_ms)
    try:
        index = httpx.post(f"{url}/v2/repository/index").json()
        names = sorted({e["name"] for e in index})
        model = args.model or (
            names[0] if len(names) == 1 else sys.exit(f"--model: one of {', '.join(names)}")
        )
        have = sorted(int(e["version"]) for e in index if e["name"] == model and "version" in e)
        if len(have) < 2:
            sys.exit(f"--repository: model {model!r} has {len(have)} version(s); two are needed")
        versions = [str(have[-2]), str(have[-1])]  # the newest serves first: the first swap goes back one
        answers, loads, wall = asyncio.run(run(url, model, versions, texts, args))
        from prometheus_client.parser import text_string_to_metric_families

        server = {
            s.name: s.value
            for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for s in f.samples
            if s.name in ("pmserve_model_load_seconds_sum", "pmserve_model_load_seconds_count")
        }
    finally:
        stop(proc)
    res = summarise(answers, loads, wall)
    res["server_load_seconds_mean"] = round(
        server.get("pmserve_model_load_seconds_sum", 0)
        / max(server.get("pmserve_model_load_seconds_count", 0), 1),
        2,
    )
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {**machine(), "load_average_before": [round(x, 2) for x in load_before]},
        "repository": str(args.repository),
        "model": model,
        "versions": versions,
        "concurrency": args.concurrency,
        "inputs": args.inputs,
        "gap_s": args.gap_s,
        "result": res,
    }
    write_json(args.out, out)
    print(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
