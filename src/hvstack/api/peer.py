"""The unix socket's peer check, made when a connection arrives, before any request.

:func:`peer_checked_protocol` returns uvicorn's HTTP protocol with one change: on a
connection whose peer (SO_PEERCRED: the connecting process's uid and gid, from the
kernel) is not allowed by :func:`hvstack.host.auth.peer_allowed`, whatever the peer
sends is dropped, answered once with a 403 problem+json, and the connection closed.
WebSocket upgrades start as HTTP on the same connection, so they are covered too. The
socket file's mode (0660, root and the group) already keeps others out; this is the
check that does not depend on file modes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct

from uvicorn.protocols.http.h11_impl import H11Protocol

from hvstack.api.problems import MEDIA_TYPE, problem_body
from hvstack.errors import AccessDenied
from hvstack.host.auth import peer_allowed, peer_policy, user_of

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")  # pid, uid, gid
DENIED_LINGER = 10.0  # seconds a refused peer may take to send its request


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return pid, uid, gid


def _denial(uid: int) -> bytes:
    # Written to the transport before any request is parsed: uvicorn's response
    # machinery is not running yet, so the HTTP head is spelled out here.
    body = json.dumps(problem_body(AccessDenied(
        f"uid {uid} may not use this socket: only root, the service's user and members "
        "of its group may"))).encode()
    head = (f"HTTP/1.1 403 Forbidden\r\ncontent-type: {MEDIA_TYPE}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def peer_checked_protocol(group_gid: int) -> type[H11Protocol]:
    class PeerCheckedProtocol(H11Protocol):
        denied_uid: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            try:
                pid, uid, gid = peer_credentials(sock)
            except (OSError, AttributeError, struct.error):
                uid, gid, pid = -1, -1, 0
            if uid in (0, os.geteuid()):
                return  # allowed whatever the user database says: no lookups
            name, primary = user_of(uid)
            if uid < 0 or not peer_allowed(uid, gid, peer_policy(group_gid), name, primary):
                self.denied_uid = uid
                log.warning("refused a connection on the unix socket from uid %d (pid %d)",
                            uid, pid)
                # one that sends nothing is not kept waiting on the service's resources
                asyncio.get_running_loop().call_later(DENIED_LINGER, transport.close)

        def data_received(self, data: bytes) -> None:
            if self.denied_uid is None:
                super().data_received(data)
            elif not self.transport.is_closing():
                self.transport.write(_denial(self.denied_uid))
                self.transport.close()

    return PeerCheckedProtocol
