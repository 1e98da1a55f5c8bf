"""A client for the QEMU guest agent (qemu-ga) of one VM, on its virtio-serial socket.

The agent is the guest half of the integration services. Its channel is a byte pipe
that may hold stale replies, half-written lines or garbage from a broken guest, so:

* a session starts with ``guest-sync-delimited`` and a random id, and everything up
  to the matching reply is dropped;
* lines that are not JSON objects are skipped; a line longer than the read limit
  breaks the session, which is re-synchronised on the next call;
* every call has a timeout; a timed-out or cancelled call also forces a re-sync,
  because its reply may still arrive (and would be taken for the next call's). The
  timeout bounds the wait for the agent to answer, not the transfer of a large answer
  (``guest-exec-status`` carries up to 2 x 16 MiB of output as base64, which takes
  long on a busy host or a slow channel): each part of a reply that arrives moves the
  deadline back by the time that part may take at :data:`MIN_REPLY_RATE`, so a reply
  that keeps coming is read to its end, and one that trickles in slower still times
  out;
* calls on one VM are serialised; calls on different VMs never wait on each other.

Errors: :class:`AgentUnavailable` (no contact: the socket is gone or nothing answers in
time), :class:`GuestCommandError` (the agent answered with an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from hvstack.errors import Conflict, HvError

log = logging.getLogger(__name__)

READ_LIMIT = 48 * 1024 * 1024  # guest-exec-status: 2 x 16 MiB of output, as base64
DEFAULT_TIMEOUT = 10.0
MIN_REPLY_RATE = 256 * 1024
"""Bytes per second below which a reply on its way counts as stalled (a full
guest-exec-status reply may thus take up to three minutes on top of the timeout)."""
_CHUNK = 256 * 1024


class AgentUnavailable(Conflict):
    slug = "guest-agent-unavailable"
    title = "The guest agent does not answer"


class GuestCommandError(HvError):
    http_status = 422
    slug = "guest-command-failed"
    title = "The guest refused the command"


class GuestAgent:
    def __init__(self, socket_path: str, vm_name: str) -> None:
        self.socket_path = socket_path
        self.vm_name = vm_name
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._synced = False
        self._pending = bytearray()  # read past the last complete line

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader and self._writer and not self._writer.is_closing():
            return self._reader, self._writer
        # No wait_for here: the caller's asyncio.timeout bounds it, and 3.11's wait_for
        # can swallow a cancellation that races with the connection's failure.
        reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=_CHUNK)
        self._reader, self._writer, self._synced = reader, writer, False
        self._pending = bytearray()
        return reader, writer

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        self._synced = False
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read_line(self, reader: asyncio.StreamReader,
                         deadline: asyncio.Timeout | None) -> bytes:
        """The next line on the channel; each part that arrives moves ``deadline`` back
        by the time it may take at :data:`MIN_REPLY_RATE`. ValueError past READ_LIMIT."""
        scanned = 0
        while (end := self._pending.find(b"\n", scanned)) < 0:
            if len(self._pending) > READ_LIMIT:
                raise ValueError(f"a message from the guest agent is longer than "
                                 f"{READ_LIMIT} bytes")
            scanned = len(self._pending)
            chunk = await reader.read(_CHUNK)
            if not chunk:
                raise ConnectionError("the guest agent channel closed")
            self._pending += chunk
            if deadline is not None and (when := deadline.when()) is not None:
                deadline.reschedule(when + len(chunk) / MIN_REPLY_RATE)
        line = bytes(self._pending[:end + 1])
        del self._pending[:end + 1]
        return line

    async def _read_message(self, reader: asyncio.StreamReader,
                            deadline: asyncio.Timeout | None = None) -> dict[str, Any]:
        """The next JSON object on the channel; garbage and delimiters are skipped."""
        while True:
            line = await self._read_line(reader, deadline)
            text = line.rsplit(b"\xff", 1)[-1].strip()
            if not text:
                continue
            try:
                message = json.loads(text)
            except ValueError:
                log.debug("%s: skipping garbage from the guest agent: %r", self.vm_name,
                          text[:80])
                continue
            if isinstance(message, dict):
                return message

    async def _sync(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    deadline: asyncio.Timeout) -> None:
        sync_id = secrets.randbelow(2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        writer.write(b"\xff" + json.dumps(request).encode() + b"\n")
        await writer.drain()
        while (await self._read_message(reader, deadline)).get("return") != sync_id:
            pass
        self._synced = True

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = DEFAULT_TIMEOUT, expect_reply: bool = True) -> Any:
        """Run one agent command and return its ``return`` value."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    reader, writer = await self._connect()
                    if not self._synced:
                        await self._sync(reader, writer, deadline)
                    writer.write(json.dumps(message).encode() + b"\n")
                    await writer.drain()
                    if not expect_reply:
                        self._synced = False  # a late reply must not be taken for another
                        return None
                    reply = await self._read_message(reader, deadline)
            except asyncio.CancelledError:
                self._synced = False
                raise
            except TimeoutError as exc:
                self._synced = False
                raise AgentUnavailable(
                    f"the guest agent of VM '{self.vm_name}' did not answer {command} within "
                    f"{timeout:g} s", vm=self.vm_name, command=command,
                ) from exc
            except (OSError, ConnectionError, ValueError) as exc:
                await self.close()
                raise AgentUnavailable(
                    f"no contact with the guest agent of VM '{self.vm_name}': {exc}",
                    vm=self.vm_name, command=command,
                ) from exc
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", str(error)) if isinstance(error, dict) else str(error)
            raise GuestCommandError(f"the guest agent of VM '{self.vm_name}' refused "
                                    f"{command}: {desc}", vm=self.vm_name, command=command)
        return reply.get("return")
