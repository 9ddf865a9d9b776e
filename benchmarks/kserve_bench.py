"""`pmserve serve` against KServe's Python model server, and both against the bundle's raw ONNX Runtime throughput.

    python benchmarks/kserve_bench.py --bundle BUNDLE [--repeats 3] [--seconds 6] [--concurrency 1,8,32]
                                      [--inputs words,glosses] [--servers ...] [--kserve-python PYTHON]

Servers, each a process of its own on 127.0.0.1 serving the same bundle with ONNX Runtime's default threads:
  pmserve          `pmserve serve` as shipped: --max-batch 32 --max-wait-ms 5, length-aware batching
  pmserve-mixed    the same with --no-by-length: one padded call per gathered batch (the batcher before issue 18)
  pmserve-1        --max-batch 1: one model call per request
  kserve           kserve.ModelServer with the batcher a user writes in an afternoon (benchmarks/kserve_server.py:
                   an asyncio queue, up to 32 inputs after a fixed 5 ms wait, one padded call in a worker thread)
  kserve-1         kserve.ModelServer with one synchronous model call per request (KServe's plain predict)
  kserve-tuned     kserve with the two settings pmserve serve makes besides its batcher: ONNX Runtime's threads
                   not spinning between runs, gc.freeze() after loading (a KServe user could make them too:
                   how much of the gap they are)
KServe runs in its own environment (benchmarks/kserve_env.sh; --kserve-python) and wraps pmserve's OrtModel, so
both servers run the very same tokenizer and ONNX Runtime session. Load: benchmarks/serve_bench.py's closed-loop
clients on raw keep-alive sockets, one text per v2 infer request, --seconds (or --requests) per cell after a
short warm-up, for each input set and concurrency. The servers take turns: every repeat starts each server once
(in an order rotated by the repeat) and runs all its cells; a cell's figures are medians over the repeats.

The limit: the same bundle's OrtModel.scores (tokenizer + ONNX Runtime, in process, no HTTP) on the same texts,
at batch sizes 1 to 64, texts in arrival order and sorted by length (what `pmserve predict` does); the best of
these is what a server could reach if HTTP, queueing and padding cost nothing. Where the rest goes, for pmserve
at the highest concurrency: CPU seconds per request of the client and of the server process (they share the
cores), the fraction of wall time the model was running, padded / input tokens, and the time queued.

Bounded: about repeats x servers x sets x concurrencies x (--seconds + 1) s of load plus server starts. Before
it starts it waits (at most --wait-load s) for the 1-minute load average to fall below --max-load, and records
the load it got. Targets (issue 18), at concurrency 32: pmserve >= 1.5x kserve's throughput at equal or lower
p99; batching >= 1.5x --max-batch 1 on glosses; served >= 80% of the raw limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import BENCH, clean_env, free_port, machine, provenance, stop, venv_bin, wait_ready, write_json
from serve_bench import batch_stats, input_sets, load

SERVERS = {
    "pmserve": ("pmserve", ["--max-batch", "32", "--by-length"]),
    "pmserve-mixed": ("pmserve", ["--max-batch", "32", "--no-by-length"]),
    "pmserve-1": ("pmserve", ["--max-batch", "1"]),
    "kserve": ("kserve", ["--max-batch", "32"]),
    "kserve-1": ("kserve", ["--max-batch", "1"]),
    "kserve-tuned": ("kserve", ["--max-batch", "32", "--tuned"]),
}


def start(kind: str, opts: list[str], bundle: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "pmserve":
        cmd = [sys.executable, "-m", "pmserve", "serve", str(bundle), "--name", "m", "--port", str(port)]
        cmd += [*opts, "--max-wait-ms", str(args.max_wait_ms), "--threads", "0"]
    else:
        # by file path: only benchmarks/ goes first on its sys.path; pmserve is installed in KServe's environment
        cmd = [args.kserve_python, str(BENCH / "kserve_server.py"), "--bundle", str(bundle)]
        cmd += ["--port", str(port), *opts, "--max-wait-ms", str(args.max_wait_ms), "--threads", "0"]
    log = open(args.server_log, "a")  # noqa: SIM115 -- the child writes to it
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=clean_env())
    return proc, wait_ready(
        proc, f"http://127.0.0.1:{port}", "/v2/models/m/ready", f"{kind} (log {log.name})"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pm_metrics(url: str) -> dict[str, float]:
    """Sums from pmserve's /metrics: inference seconds, queue seconds, padded and input tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in f.samples:
            if s.name in ("pmserve_inference_seconds_sum", "pmserve_queue_seconds_sum"):
                out[s.name] = out.get(s.name, 0.0) + s.value
            elif s.name == "pmserve_batch_tokens_total":
                out[s.labels["kind"]] = out.get(s.labels["kind"], 0.0) + s.value
    return out


def raw_limit(bundle: Path, texts: list[str], sizes: list[int], seconds: float) -> list[dict]:
    """OrtModel.scores in process on `texts`: texts/s by batch size, arrival order and sorted by length."""
    from pmserve.predict import OrtModel

    model = OrtModel.from_bundle(bundle, "cpu", 0)
    model.scores(texts[:8])
    rows = []
    for order in ("arrival", "sorted"):
        xs = sorted(texts, key=len) if order == "sorted" else list(texts)
        for b in sizes:
            batches = [xs[k : k + b] for k in range(0, len(xs), b)]
            n, t0 = 0, time.perf_counter()
            for batch in batches:
                model.scores(batch)
                n += len(batch)
                if time.perf_counter() - t0 > seconds:
                    break
            rows.append({"order": order, "batch": b, "texts_per_s": round(n / (time.perf_counter() - t0), 1)})
    return rows


def wait_for_quiet(max_load: float, wait_s: float) -> tuple[float, float, float]:
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"Of {', '.join(SERVERS)}.")
    ap.add_argument("--inputs", default="words,glosses")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="Most seconds of load per cell.")
    ap.add_argument("--requests", type=int, default=5000, help="Most answered requests per cell.")
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--raw-seconds", type=float, default=8.0, help="Most seconds per raw batch size.")
    ap.add_argument("--kserve-python", default=None, help="Default: .venv-kserve/bin/python.")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait-load", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kserve_bench.json"))
    args = ap.parse_args()
    names = args.servers.split(",")
    if any(SERVERS[n][0] == "kserve" for n in names):
        args.kserve_python = args.kserve_python or str(venv_bin(".venv-kserve", "python", "kserve_env.sh"))
        check = [args.kserve_python, "-c", "import kserve, pmserve.predict"]
        if subprocess.run(check, env=clean_env(), cwd="/", capture_output=True).returncode != 0:
            sys.exit(
                f"{args.kserve_python} cannot import kserve and pmserve: run `bash benchmarks/kserve_env.sh`"
            )
    args.server_log = (
        Path(tempfile.gettempdir()) / "kserve_bench.server.log"
    )  # the servers' stderr, for errors
    args.server_log.write_text("")

    sets = input_sets(args.inputs.split(","))
    conc = [int(x) for x in args.concurrency.split(",")]
    load_start = wait_for_quiet(args.max_load, args.wait_load)
    print(f"load average at start: {load_start}", flush=True)

    raw = {
        name: raw_limit(args.bundle, texts[:640], [1, 8, 16, 32, 64], args.raw_seconds)
        for name, texts in sets.items()
    }
    for name, rows in raw.items():
        print(name, "raw", json.dumps(rows), flush=True)

    cells: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for server in order:
            kind, opts = SERVERS[server]
            proc, url = start(kind, opts, args.bundle, args)
            try:
                for set_name, texts in sets.items():
                    for c in conc:
                        asyncio.run(load(url, texts[::-1], c, args.warmup, 5))
                        m0 = pm_metrics(url) if kind == "pmserve" else {}
                        b0 = batch_stats(url) if kind == "pmserve" else (0, 0)
                        cpu_s0, cpu_c0 = cpu_seconds(proc.pid), time.process_time()
                        res = asyncio.run(load(url, texts, c, args.requests, args.seconds))
                        cpu_s, cpu_c = cpu_seconds(proc.pid) - cpu_s0, time.process_time() - cpu_c0
                        row = {"server": server, "inputs": set_name, "concurrency": c, "repeat": rep, **res}
                        row["load_1min"] = round(os.getloadavg()[0], 2)
                        n = max(res["requests"], 1)
                        row["server_cpu_ms_per_req"] = round(1000 * cpu_s / n, 2)
                        row["client_cpu_ms_per_req"] = round(1000 * cpu_c / n, 2)
                        if kind == "pmserve":
                            m1, b1 = pm_metrics(url), batch_stats(url)
                            d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
                            row["mean_batch"] = round((b1[1] - b0[1]) / max(b1[0] - b0[0], 1), 1)
                            row["calls"] = int(b1[0] - b0[0])
                            row["model_busy"] = round(
                                d.get("pmserve_inference_seconds_sum", 0) / res["seconds"], 3
                            )
                            row["queue_ms_mean"] = round(1000 * d.get("pmserve_queue_seconds_sum", 0) / n, 2)
                            row["padded_per_input_token"] = round(
                                d.get("padded", 0) / max(d.get("input", 0), 1), 3
                            )
                        print(json.dumps(row), flush=True)
                        cells.setdefault((server, set_name, c), []).append(row)
            finally:
                stop(proc)

    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return round(statistics.median(vals), 3) if vals else None

    keys = [
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "errors",
        "mean_batch",
        "calls",
        "model_busy",
        "queue_ms_mean",
    ]
    keys += ["padded_per_input_token", "server_cpu_ms_per_req", "client_cpu_ms_per_req", "load_1min"]
    medians = [
        {"server": s, "inputs": i, "concurrency": c, "repeats": len(rows), **{k: med(rows, k) for k in keys}}
        for (s, i, c), rows in cells.items()
    ]
    medians.sort(key=lambda r: (list(sets).index(r["inputs"]), names.index(r["server"]), r["concurrency"]))

    def rps(s, i, c):
        return next(
            (
                r["throughput_rps"]
                for r in medians
                if (r["server"], r["inputs"], r["concurrency"]) == (s, i, c)
            ),
            None,
        )

    top = max(conc)
    ratios = {}
    for i in sets:
        best_raw = max(r["texts_per_s"] for r in raw[i])
        ratio = {}
        for a, b in [
            ("pmserve", "kserve"),
            ("pmserve", "kserve-1"),
            ("pmserve", "kserve-tuned"),
            ("pmserve", "pmserve-1"),
            ("pmserve", "pmserve-mixed"),
        ]:
            if rps(a, i, top) and rps(b, i, top):
                ratio[f"{a}/{b}"] = round(rps(a, i, top) / rps(b, i, top), 2)
        for s in names:
            if rps(s, i, top):
                ratio[f"{s}/raw"] = round(rps(s, i, top) / best_raw, 2)
        ratios[i] = ratio
    result = {
        **provenance("kserve_bench.py"),
        "bundle": str(args.bundle),
        "machine": machine(),
        "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "servers": {s: " ".join(SERVERS[s][1]) for s in names},
        "raw_limit": raw,
        f"ratios_at_concurrency_{top}": ratios,
        "medians": medians,
        "rows": [r for rows in cells.values() for r in rows],
    }
    write_json(args.out, result)
    print()
    print("| inputs | server | C | req/s | p50 ms | p99 ms | mean batch | padded/input tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in medians:
        print(
            f"| {r['inputs']} | {r['server']} | {r['concurrency']} | {r['throughput_rps']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {r['mean_batch'] if r['mean_batch'] is not None else '-'} "
            f"| {r['padded_per_input_token'] if r['padded_per_input_token'] is not None else '-'} |"
        )
    print(f"\nratios at concurrency {top}: {json.dumps(ratios)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
