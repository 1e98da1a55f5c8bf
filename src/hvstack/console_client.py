"""WebSocket access to the host service's consoles, for the CLI and Python callers.

``open_websocket(host, path)`` connects to a WebSocket route of the API over the same
address, TLS trust and token the REST client uses (:mod:`hvstack.transport`) with the
``websockets`` library, which speaks WebSocket over a unix socket (httpx does not).
Failures come back as :class:`hvstack.client.ApiError`: a refused handshake carries the
server's problem+json, an unreachable service says so.

The serial console protocol (see :mod:`hvstack.api.routes.console`): binary frames are
bytes to and from the guest; text frames from the server are JSON notices, parsed by
:func:`parse_notice`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from hvstack.client import ApiError, unreachable, url_path
from hvstack.transport import endpoint

OPEN_TIMEOUT = 10.0


@dataclass(frozen=True)
class ConsoleNotice:
    event: str
    detail: str = ""
    role: str | None = None


def parse_notice(text: str) -> ConsoleNotice:
    try:
        raw: dict[str, Any] = json.loads(text)
        return ConsoleNotice(str(raw["event"]), str(raw.get("detail") or ""),
                             raw.get("role"))
    except (ValueError, KeyError, TypeError):
        return ConsoleNotice("unknown", text)


def vm_path(name: str, what: str, **params: str) -> str:
    """``/vms/NAME/WHAT?params`` with the VM name escaped."""
    path = url_path("vms", name, what)
    return f"{path}?{urlencode(params)}" if params else path


def _problem(exc: InvalidStatus) -> ApiError:
    response = exc.response
    try:
        problem = json.loads(response.body or b"{}")
        if not isinstance(problem, dict):
            raise ValueError(problem)
    except ValueError:
        problem = {"detail": (response.body or b"").decode(errors="replace")
                   or f"HTTP {response.status_code}"}
    problem.setdefault("detail", f"HTTP {response.status_code}")
    return ApiError(response.status_code, problem)


@asynccontextmanager
async def open_websocket(
    host: str | None, path: str, *, subprotocols: Sequence[str] | None = None,
    open_timeout: float = OPEN_TIMEOUT, token: str | None = None,
    fingerprint: str | None = None, ca_file: str | None = None,
) -> AsyncIterator[ClientConnection]:
    """Connect to ``/api/v1`` + ``path`` on the host service (token and TLS trust as
    :class:`hvstack.client.Client` takes them)."""
    target = endpoint(host, token, fingerprint, ca_file)
    address = target.address
    protocols = [Subprotocol(p) for p in subprotocols] if subprotocols else None
    options: dict[str, Any] = {"subprotocols": protocols, "open_timeout": open_timeout,
                               "max_size": 4 * 1024 * 1024, "compression": None,
                               "additional_headers": target.headers()}
    url = target.url(f"/api/v1{path}", websocket=True)
    try:
        if address.kind == "unix":
            opener = unix_connect(address.path, url, **options)
        else:
            opener = connect(url, proxy=None, ssl=target.ssl, **options)
        websocket = await opener
    except InvalidStatus as exc:
        raise _problem(exc) from exc
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise unreachable(str(address), exc) from exc
    try:
        yield websocket
    finally:
        await websocket.close()
