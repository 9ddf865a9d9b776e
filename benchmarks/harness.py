"""The harness every benchmark script shares: where things are, how a peer's or pmserve's process is run and
measured, medians, and how a results file is written.

Why one module: these pieces were copied from script to script, and one copy went wrong for all of them at once
(the repository root on a peer process's PYTHONPATH: its top-level kernels/ folder, installed as
pmserve.kernels, then hides the PyPI package `kernels` that transformers imports). Here that rule is written
once: `clean_env` never lets the root onto a child's path, and a script is run by its file path, which puts only
its own folder first on sys.path. pmserve reaches a process through an installed environment (.venv; the
peers' environment scripts install it where a peer needs it), never through the checkout's root.

Nothing here imports pmserve, torch or a peer tool, so a peer's interpreter can import it as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


# ---------------------------------------------------------------- environments and processes


def venv_bin(venv: str, tool: str = "python", env_script: str | None = None) -> Path:
    """ROOT/venv/bin/tool; when it is missing and `env_script` names the script that builds the environment,
    the benchmark stops with the command to run."""
    path = ROOT / venv / "bin" / tool
    if env_script and not path.exists():
        sys.exit(f"{path} missing: run `bash benchmarks/{env_script}` first")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, without the repository root on PYTHONPATH: the root's kernels/
    would hide the PyPI `kernels` from the child's transformers."""
    env = {**os.environ, **extra}
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> tuple[float, str]:
    """Run a command (environment: `clean_env` plus `env`); its wall seconds and its output (stdout + stderr),
    also written to `log` when given. A failure raises CalledProcessError with the output."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(**(env or {})))
    dt = time.perf_counter() - t0
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(" ".join(cmd) + "\n\n" + out)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd, out)
    return dt, out


def _anon_kib(pid: int) -> int:
    """RssAnon (KiB) of a process and its descendants now: the memory it allocated, without the file pages of
    what it memory-maps (a memory-mapped base counts in RSS as far as the page cache lets it stay)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, peak RSS (MB, ru_maxrss) and peak anonymous memory (MB, RssAnon sampled every 20 ms) of one
    subprocess and its descendants. `env` is the whole environment (default: `clean_env()`)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], _anon_kib(p.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = p.stdout.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd[:6]))} ... failed:\n{out.decode(errors='replace')[-4000:]}"
        )
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak[0] / 1024}


# ---------------------------------------------------------------- servers on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    proc: subprocess.Popen,
    url: str,
    ready: str = "/v2/health/ready",
    what: str = "server",
    seconds: float = 180,
) -> str:
    """`url` once the server process answers `ready` with 200; exits the benchmark if it dies or never does."""
    import httpx  # not every environment that imports the harness has it

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else "see its log"
            sys.exit(f"{what} exited {proc.returncode}: {err}")
        try:
            if httpx.get(f"{url}{ready}", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{what} not ready in {seconds:.0f} s")


def stop(proc: subprocess.Popen, seconds: float = 60) -> None:
    """SIGTERM, as a user stops a server; killed if it has not exited after `seconds`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---------------------------------------------------------------- timing


def medians(rows: Iterable[dict], keys: Iterable[str]) -> dict[str, float]:
    """The median of each key over rows (repeats of one measurement)."""
    rows = list(rows)
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def blocks(fns: dict, rounds: int, block: int = 10, warm: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every function: each round runs each in turn, `warm` untimed then `block` timed calls
    (blocks, so that no call competes with another backend's still-spinning threads)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warm):
                fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return times


def machine() -> dict:
    """What a result was measured on."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def utc_now(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    return datetime.now(timezone.utc).strftime(fmt)


def provenance(script: str) -> dict:
    """A result's first keys: when, and the command that made it (as a reader would type it again)."""
    return {"date": utc_now(), "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:])}


# ---------------------------------------------------------------- results files


def read_json(path: Path, default=None):
    """A results file's content; `default` when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() or default is None else default


def write_json(path: Path | str, obj, indent: int | None = 2, default=None) -> Path:
    """Write a results file whole: to a temporary name beside it, then renamed into place, so a reader never sees
    half of one (the folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=default) + "\n")
    os.replace(tmp, path)
    return path


def append_result(path: Path, r: dict) -> list[dict]:
    """Add one run to a results file, read again just before: sweeps sharing a file each keep the others' runs."""
    results = read_json(path, [])
    results.append(r)
    write_json(path, results, indent=1)
    return results


def run_args(doc: str | None) -> argparse.Namespace:
    """The command line of a script that reads one finished RUN and may write its figures as JSON."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", default=None)
    return ap.parse_args()
