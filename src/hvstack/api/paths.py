"""A guard for escaped slashes in request paths.

Clients escape each name or id as one path segment (``hvstack.client.segment``), but the
ASGI server decodes the path before routing: ``/vms/web%2Fconsole-log`` would be routed
as ``/vms/web/console-log``, another operation on another object. No name or id holds a
'/', so a path whose raw form has an escaped slash is refused (400) before routing.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from hvstack.api.problems import problem_response
from hvstack.errors import InvalidInput

DETAIL = ("the URL holds an escaped '/' (%2F) in a name or id; no name or id contains "
          "'/' or '\\'")


class EscapedSlashGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: Any = scope.get("raw_path") if scope["type"] in ("http", "websocket") else None
        lowered = raw.lower() if isinstance(raw, bytes) else b""
        if b"%2f" not in lowered and b"%5c" not in lowered:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await problem_response(InvalidInput(DETAIL))(scope, receive, send)
