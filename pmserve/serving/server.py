"""`pmserve serve`: load and check the models (bundles, or a repository's newest good versions), bind the port,
build the app and run it under uvicorn until SIGTERM or SIGINT, draining in-flight requests.

This is where the long-lived objects are built, once, and handed down: the repository to the app, the models to
the model table. Nothing below imports this module.
"""

from __future__ import annotations

import gc
import ipaddress
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import PMError
from .app import create_app
from .config import ServeConfig
from .model import load_models
from .repository import Repository


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error before anything starts."""
    try:
        family, kind, proto = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0][:3]
        # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it Nagle holds every
        # response body until the client's delayed ACK, 40 ms later, on keep-alive connections
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise PMError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether the socket listens on a loopback address only (127.0.0.0/8, ::1), not 0.0.0.0 or a network's."""
    try:
        return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback
    except ValueError:
        return False


def serve(
    bundles: list[Path],
    names: list[str],
    cfg: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Callable[[str], None] = print,
    repository: Path | None = None,
) -> None:
    """Load and verify every bundle (or the latest good version of every model in `repository`), then serve
    until SIGTERM or SIGINT: stop accepting, let in-flight requests finish (at most cfg.drain_s seconds), drain
    the batchers, return."""
    import uvicorn

    cfg.check()
    repo = None
    if repository is not None:
        if bundles or names:
            raise PMError(
                "--repository: serves the models in REPO; give it without BUNDLE arguments and --name"
            )
        repo = Repository(Path(repository), cfg, log)
        models = repo.load_all()
    elif not bundles:
        raise PMError("BUNDLE: give one or more bundles, or --repository REPO")
    else:
        models = load_models(bundles, names, cfg)
    sock = listen(host, port)
    loopback = is_loopback(sock)
    app = create_app(models, cfg, repo, loopback)
    # torch, transformers and the models leave some 400k objects for the cyclic GC; a full collection walks them
    # all (0.15 to 0.3 s on 2 CPU cores), a pause that every request in flight pays: it was the p99 under load
    # (250 ms against a p50 of 60). Loaded once, they live as long as the server: move them out of the collector's
    # sight. (A model repository's first versions, once swapped out, are freed by reference counting; only
    # reference cycles among them stay.)
    gc.collect()
    gc.freeze()
    for s in models:
        what = "causal-lm" if s.causal else "embedding" if s.embedding else f"{len(s.labels)} classes"
        log(f"model {s.name}: {s.path} ({s.kind}, {what}, {', '.join(s.providers)})")
    bound = sock.getsockname()[1]
    log(f"listening on http://{host}:{bound} (Open Inference Protocol v2 at /v2, metrics at /metrics)")
    if cfg.api_key is None and not loopback:
        log("no --api-key: whoever reaches this address may run the models (see README, threat model)")
    if repo is not None and cfg.admin_key is None:
        where = "from this machine only (loopback)" if loopback else "off (beyond loopback, no --admin-key)"
        log(f"loading and unloading models: {where}")
    if repo is not None:
        every = f"every {cfg.poll_s:g} s" if cfg.poll_s else "never (--poll-s 0): load through /v2/repository"
        log(f"repository {repository}: looking for new versions {every}")
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=cfg.drain_s,
        lifespan="on",
    )
    # uvicorn re-raises the signal it stopped for once it has drained; a drained SIGTERM is a clean stop, so
    # let it reach a handler that does nothing instead of the default one that kills the process.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log("stopped: in-flight requests answered")
