"""Console routes: the serial console and VNC as WebSockets, and screenshots.

``WS /api/v1/vms/{ref}/console?mode=write|read-only|force``
    The serial console. Server to client: binary frames are the guest's output; text
    frames are JSON notices ``{"event", "detail", "role"}`` (see
    :class:`hvstack.host.console_hub.Notice`). Client to server: binary or text frames
    are input (text as UTF-8), passed to the guest only from the viewer that has the
    writer role.
``WS /api/v1/vms/{ref}/vnc``
    A byte pipe to the VM's VNC server (RFB), as noVNC expects: binary frames, the
    ``binary`` subprotocol accepted when offered.
``GET /api/v1/vms/{ref}/screenshot?max_width=N``
    The display as ``image/png``.

Who may connect at all is decided before any route runs, for HTTP and WebSocket alike
(:mod:`hvstack.api.guard`: a token on TCP, the peer check on the unix socket, and the
Origin rule on both); :func:`console_access` is where a finer, per-console rule would
plug in. An error known before a WebSocket is accepted is answered as an HTTP
problem+json (the denial-response extension), or, on a server without it, by closing
with code 4000 + HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Query, Response, WebSocket
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect, WebSocketState

from hvstack.api.deps import console_ops_of
from hvstack.api.problems import problem_response
from hvstack.errors import HvError, InvalidInput
from hvstack.host.console_hub import AttachMode, ConsoleViewer, Notice
from hvstack.host.console_ops import ConsoleOperations

router = APIRouter(prefix="/api/v1/vms", tags=["consoles"])
log = logging.getLogger(__name__)

SEND_TIMEOUT = 30.0  # a client that takes longer to accept a frame is dropped
VNC_CHUNK = 64 * 1024


def console_access(connection: HTTPConnection) -> ConsoleOperations:
    """The access check for consoles, and the console operations of this app.

    Authentication happened before the route ran (:class:`hvstack.api.guard.
    ListenerGuard`): every authenticated caller may use every console, as every token
    grants the whole API. A per-console rule (roles, read-only viewers) plugs in here
    for every console route at once.
    """
    return console_ops_of(connection)


async def _deny(websocket: WebSocket, exc: HvError) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(problem_response(exc))
        return
    await websocket.accept()
    await websocket.close(code=4000 + exc.http_status, reason=exc.message[:120])


def _notice_json(notice: Notice) -> str:
    return json.dumps({"event": notice.event, "detail": notice.detail,
                       "role": notice.role.value if notice.role else None})


async def _to_client(websocket: WebSocket, viewer: ConsoleViewer) -> None:
    while (item := await viewer.receive()) is not None:
        if isinstance(item, bytes):
            await asyncio.wait_for(websocket.send_bytes(item), SEND_TIMEOUT)
        else:
            await asyncio.wait_for(websocket.send_text(_notice_json(item)), SEND_TIMEOUT)
    reason = viewer.closed_reason or "detached"
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.close(code=1000, reason=reason[:120])


async def _client_bytes(websocket: WebSocket, text_encoding: str) -> AsyncIterator[bytes]:
    """What the client sends, as bytes (text frames encoded), until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None and message.get("text") is not None:
            data = str(message["text"]).encode(text_encoding, errors="replace")
        if data:
            yield data


async def _from_client(websocket: WebSocket, viewer: ConsoleViewer) -> None:
    async for data in _client_bytes(websocket, "utf-8"):
        await viewer.write(data)


async def _run_both(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the two directions until either ends, then stop the other."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect | TimeoutError
                                                  | OSError):
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@router.websocket("/{ref}/console")
async def serial_console(websocket: WebSocket, ref: str, mode: str = Query("write"),
                         ops: ConsoleOperations = Depends(console_access)) -> None:
    try:
        try:
            attach_mode = AttachMode(mode)
        except ValueError:
            raise InvalidInput(f"mode must be one of {', '.join(m.value for m in AttachMode)}",
                               mode=mode) from None
        viewer = ops.attach_serial(ref, attach_mode)
    except HvError as exc:
        await _deny(websocket, exc)
        return
    try:
        await websocket.accept()
        await _run_both(_to_client(websocket, viewer), _from_client(websocket, viewer))
    finally:
        viewer.detach()
        await _close_quietly(websocket)


async def _close_quietly(websocket: WebSocket) -> None:
    if websocket.application_state is not WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await websocket.close()


async def _vnc_to_client(websocket: WebSocket, reader: asyncio.StreamReader) -> None:
    while chunk := await reader.read(VNC_CHUNK):
        await asyncio.wait_for(websocket.send_bytes(chunk), SEND_TIMEOUT)


async def _vnc_from_client(websocket: WebSocket, writer: asyncio.StreamWriter) -> None:
    async for data in _client_bytes(websocket, "latin-1"):
        writer.write(data)
        await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)


@router.websocket("/{ref}/vnc")
async def vnc_console(websocket: WebSocket, ref: str,
                      ops: ConsoleOperations = Depends(console_access)) -> None:
    try:
        reader, writer = await ops.open_vnc(ref)
    except HvError as exc:
        await _deny(websocket, exc)
        return
    try:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol="binary" if "binary" in offered else None)
        await _run_both(_vnc_to_client(websocket, reader), _vnc_from_client(websocket, writer))
    finally:
        writer.close()
        await _close_quietly(websocket)


@router.get("/{ref}/screenshot", response_class=Response,
            responses={200: {"content": {"image/png": {}},
                             "description": "the VM's display as PNG"}})
async def screenshot(ref: str,
                     max_width: int | None = Query(None, ge=16, le=16384,
                                                   description="shrink to this width"),
                     ops: ConsoleOperations = Depends(console_access)) -> Response:
    png = await ops.screenshot(ref, max_width)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
