"""The access check in front of every route, HTTP and WebSocket alike, per listener.

:class:`ListenerGuard` wraps the app once per listener (``hv serve`` serves the same
app on its unix socket and on TCP):

- a request whose ``Origin`` header is present and not one of the service's own origins
  (its TCP listener's ``https://HOST:PORT``) is refused with 403, so a web page in a
  browser cannot drive the API;
- on TCP, every request needs ``Authorization: Bearer <token>`` with a token valid at
  that moment (401 otherwise). On the unix socket the kernel's peer credentials,
  checked when the connection is made (:mod:`hvstack.api.peer`), are the
  authentication.

A refused WebSocket gets the problem+json as an HTTP response (the denial-response
extension), or, on a server without it, a close with code 4000 + HTTP status.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from hvstack.api.problems import problem_response
from hvstack.errors import AccessDenied, HvError, NotAuthenticated
from hvstack.host.auth import TokenStore

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port made explicit, or None for
    anything that is not an http(s) origin (``null`` included)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class ListenerGuard:
    def __init__(self, app: ASGIApp, *, tokens: TokenStore | None,
                 own_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.tokens = tokens  # None: no token needed (the unix socket)
        self.own_origins = frozenset(o for o in map(normalize_origin, own_origins) if o)

    def check(self, scope: Scope) -> HvError | None:
        origin = _header(scope, b"origin")
        if origin is not None and normalize_origin(origin) not in self.own_origins:
            return AccessDenied(f"requests from the web origin '{origin[:200]}' are not "
                                f"allowed: only the service's own origin may call it",
                                origin=origin[:200])
        if self.tokens is None:
            return None
        scheme, _, token = (_header(scope, b"authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return NotAuthenticated(
                "this listener needs a token: send 'Authorization: Bearer TOKEN' (hv: "
                "--token or $HV_TOKEN; create one with 'hv auth token create NAME')")
        if self.tokens.verify(token.strip()) is None:
            return NotAuthenticated("the token is not valid: it was revoked or never issued")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        error = self.check(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        response = problem_response(error)
        if isinstance(error, NotAuthenticated):
            response.headers["WWW-Authenticate"] = "Bearer"
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
            return
        await websocket.close(code=4000 + error.http_status, reason=error.message[:120])
