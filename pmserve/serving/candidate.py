"""A candidate version's graph run once in a child process before the server opens it (`Prober`).

Why: ONNX Runtime is C++; a crafted or corrupt graph can crash it (a segfault, an abort) while it loads or runs,
and in the server's process that crash would take every model down with it. So the server first checks a
candidate's files against its manifest and encodes its parity probe's inputs (no graph opened:
pmserve.serving.model.probe_feed), then a child process opens the graph and runs it on them within
--load-timeout-s, and only if the child exits cleanly does the server open it itself
(pmserve.serving.model.load_bundle: every check, the parity probe's scores included).

Each candidate gets a fresh child (what one graph did to a process never reaches the next check), started ahead of
time: it imports ONNX Runtime and numpy (not torch) and waits for its one job on stdin, so a check costs the
graph's load and one run, not an interpreter's start (BENCHMARKS.md, RELIABILITY). A child whose server went away
reads end-of-file and exits.

`python -m pmserve.serving.candidate`, run from `/`, is the child: it reads {"model", "feed", "providers"} as one JSON line,
exits 0 when the graph ran, 2 with {"error": reason} on stdout when ONNX Runtime refused it; anything else (a
signal, a time out) is the crash it is run for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: the child must not import torch (pmserve.predict) to start fast
    from .config import ServeConfig

OK, REFUSED = 0, 2


class Prober:
    """Runs candidates' graphs in child processes, one fresh child per candidate, the next one started ahead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next: subprocess.Popen | None = None

    def _spawn(self) -> subprocess.Popen:
        # from the file system's root: `-m` puts the working directory first on the child's sys.path, and a .py
        # file there (or a checkout's kernels/) would be imported (Python 3.11's -P would do; 3.10 has none)
        return subprocess.Popen(
            [sys.executable, "-m", "pmserve.serving.candidate"],
            cwd=os.path.abspath(os.sep),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )

    def check(self, path: Path, cfg: ServeConfig) -> str | None:
        """None when the bundle's graph at `path` opens and runs on its probe in a child process, else why not:
        ONNX Runtime's error, or how the child died (a signal, past --load-timeout-s). A bundle whose files do
        not match its manifest is a PMError before any child is used."""
        import numpy as np

        from ..formats.bundle import MODEL
        from ..predict import ort_providers
        from .model import probe_feed

        feed = probe_feed(path)
        providers = ort_providers(cfg.provider)
        with tempfile.TemporaryDirectory(prefix="pmserve-candidate-") as tmp:
            feed_file = Path(tmp) / "feed.npz"
            np.savez(feed_file, **feed)
            job = {"model": str(Path(path) / MODEL), "feed": str(feed_file), "providers": providers}
            with self._lock:
                child, self._next = self._next or self._spawn(), None
            try:
                out, err = child.communicate(json.dumps(job) + "\n", timeout=cfg.load_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                return (
                    f"its graph did not load and run within --load-timeout-s {cfg.load_timeout_s:g} s in a child "
                    "process (killed)"
                )
            finally:
                with self._lock:  # the next candidate's child imports ONNX Runtime while the server goes on
                    if self._next is None:
                        self._next = self._spawn()
        return _verdict(child.returncode, out, err)

    def close(self) -> None:
        with self._lock:
            if self._next is not None:
                self._next.kill()
                self._next.communicate()
                self._next = None


def _verdict(code: int, out: str, err: str) -> str | None:
    if code == OK:
        return None
    if code == REFUSED:
        try:
            return str(json.loads(out.strip().splitlines()[-1])["error"])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    if code < 0:
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
        return f"ONNX Runtime crashed on its graph in a child process ({how}); the server did not open it"
    last = (err.strip().splitlines() or [""])[-1][:200]
    return f"its graph's check in a child process exited {code} ({last})"


def main() -> int:
    """The child: wait for one job, open its graph, run it once on its feed."""
    import numpy as np
    import onnxruntime as ort

    line = sys.stdin.readline()
    if not line.strip():  # the server went away before it had a candidate
        return OK
    job = json.loads(line)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(job["model"], so, providers=job["providers"])
        with np.load(job["feed"]) as f:
            feed = {i.name: f[i.name] for i in session.get_inputs()}
        session.run(None, feed)
    except Exception as e:  # noqa: BLE001 -- any failure means the graph cannot serve; say which
        first = (str(e).splitlines() or [""])[0][:200]
        print(json.dumps({"error": f"{Path(job['model']).name}: ONNX Runtime: {type(e).__name__}: {first}"}))
        return REFUSED
    return OK


if __name__ == "__main__":
    sys.exit(main())
