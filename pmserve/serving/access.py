"""Who may call what (`Access`): bearer tokens in front of every route, for a server that may listen beyond
loopback.

The threat model (README, "Serving"): whoever reaches the port may send anything. With --api-key every endpoint
but the health probes needs `Authorization: Bearer KEY` (Kubernetes' probes carry no token). Changing what is
served (the repository's load and unload) is a larger power than inference, so it has its own key, --admin-key,
and without one it is off unless the server listens on a loopback address only, where whoever reaches the port
already runs code on the machine. The admin key opens every endpoint. Keys are compared in constant time.
Tokens are no substitute for TLS: beyond a trusted network, put the server behind a proxy that terminates TLS.
"""

from __future__ import annotations

import hmac

from .config import ServeConfig
from .protocol import json_bytes

OPEN = frozenset({"/v2/health/live", "/v2/health/ready"})
ADMIN_PREFIX = "/v2/repository/models/"  # load and unload: what changes the models served


def bearer(scope) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _same(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


class Access:
    """ASGI middleware answering 401 (no or wrong token) or 403 (repository changes off) before any route runs,
    so that a refused request costs no body read and no model lookup."""

    def __init__(self, app, cfg: ServeConfig, loopback: bool):
        self.app, self.cfg, self.loopback = app, cfg, loopback

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, reason) when the request may not go on, else None."""
        path = scope["path"]
        if path in OPEN:
            return None
        token = bearer(scope)
        if path.startswith(ADMIN_PREFIX):
            if self.cfg.admin_key is not None:
                if _same(token, self.cfg.admin_key):
                    return None
                return 401, "loading and unloading models needs the admin key (Authorization: Bearer KEY)"
            if not self.loopback:
                return 403, (
                    "loading and unloading models is off: the server listens beyond loopback and was given "
                    "no --admin-key (PMSERVE_ADMIN_KEY)"
                )
        if self.cfg.api_key is None or _same(token, self.cfg.api_key) or _same(token, self.cfg.admin_key):
            return None
        return 401, "this server needs an API key (Authorization: Bearer KEY)"

    async def __call__(self, scope, receive, send):
        refused = self.refusal(scope) if scope["type"] == "http" else None
        if refused is None:
            return await self.app(scope, receive, send)
        status, reason = refused
        body = json_bytes({"error": reason})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="pmserve"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
