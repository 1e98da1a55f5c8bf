"""A fake of QEMU's serial chardev socket server, and helpers to read console viewers.

:class:`FakeSerialPort` listens on a unix socket like ``-chardev socket,server=on,
wait=off``: one client at a time (a second is closed at once), bytes from the client
are "typed" into the guest. The guest acts like a shell on a tty: it echoes what is
typed and, on a carriage return or newline, runs ``echo TEXT`` lines by printing TEXT
(with ``$((A*B))`` worked out, so a test can tell the output from the echo).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

from hvstack.host.console_hub import ConsoleViewer, Notice

WAIT = 10.0  # a bound for failures, never a timing assertion
_ARITHMETIC = re.compile(rb"\$\(\((\d+)\*(\d+)\)\)")


def _product(match: re.Match[bytes]) -> bytes:
    return str(int(match[1]) * int(match[2])).encode()


class FakeSerialPort:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = b""  # everything typed into the guest
        self.connections = 0
        self.close_at_once = 0  # close this many connections at once, as an exiting QEMU
        self.greeting = b""  # what the guest says to each new connection
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._client: asyncio.StreamWriter | None = None
        self._line = b""

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        """The VM stops: the socket and its connection go away."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client is not None:
            self._client.close()
        self.path.unlink(missing_ok=True)
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), WAIT)

    def say(self, data: bytes) -> None:
        """The guest writes to its serial port (dropped if nobody is connected)."""
        if self._client is not None:
            self._client.write(data)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None or self.close_at_once > 0:
            self.close_at_once = max(0, self.close_at_once - 1)
            writer.close()
            return
        self._client = writer
        self.connections += 1
        self.disconnected.clear()
        self.connected.set()
        writer.write(self.greeting)
        try:
            while data := await reader.read(4096):
                self.received += data
                self._typed(data)
        except OSError:
            pass
        finally:
            self._client = None
            self.connected.clear()
            self.disconnected.set()
            writer.close()

    def _typed(self, data: bytes) -> None:
        self.say(data.replace(b"\r", b"\r\n"))  # the tty echoes
        for byte in data:
            char = bytes((byte,))
            if char in b"\r\n":
                line, self._line = self._line.strip(), b""
                if line.startswith(b"echo "):
                    self.say(_ARITHMETIC.sub(_product, line[5:]) + b"\r\n")
                self.say(b"tiny# ")
            else:
                self._line += char


class ViewerLog:
    """Everything one viewer received so far: output bytes and notices."""

    def __init__(self, viewer: ConsoleViewer) -> None:
        self.viewer = viewer
        self.output = b""
        self.notices: list[Notice] = []
        self.ended = False

    async def _next(self) -> None:
        item = await asyncio.wait_for(self.viewer.receive(), WAIT)
        if item is None:
            self.ended = True
        elif isinstance(item, bytes):
            self.output += item
        else:
            self.notices.append(item)

    async def notice(self, event: str) -> Notice:
        """Read until a notice ``event`` arrives that was not returned before."""
        seen = 0
        while True:
            for index, notice in enumerate(self.notices[seen:], seen):
                if notice.event == event:
                    del self.notices[index]
                    return notice
            seen = len(self.notices)
            assert not self.ended, f"viewer ended before a '{event}' notice: {self.notices}"
            await self._next()

    async def text(self, text: bytes) -> bytes:
        while text not in self.output:
            assert not self.ended, f"viewer ended before {text!r}: {self.output!r}"
            await self._next()
        return self.output

    async def end(self) -> None:
        while not self.ended:
            await self._next()

    def events(self) -> list[str]:
        return [n.event for n in self.notices]
