"""The serial console hub of one VM: one connection to QEMU, many viewers, one writer.

QEMU's serial chardev is a socket server that takes one client, so the host service
holds that connection and shares it. A :class:`ConsoleHub` connects to the VM's
``serial.sock`` while at least one :class:`ConsoleViewer` is attached, copies every byte
the guest writes to all viewers, and passes input from the writer only.

Who writes: a viewer attaches in one of three modes (:class:`AttachMode`):

- ``write`` (the default) gets the writer role if nobody holds it, else it watches;
  when the writer detaches, the role passes to the longest-attached viewer that asked
  for it.
- ``read-only`` never writes.
- ``force`` takes the writer role at once; the previous writer keeps watching (and gets
  the role back, by the rule above, when the forcing viewer leaves).

Input from a viewer without the role is dropped; the viewer is told once per stretch.
Every change a viewer should know of (attached, role, serial port connected or gone)
reaches it as a :class:`Notice` between the output chunks.

The connection: QEMU creates the socket when the VM starts and drops it when the VM
stops; a restart makes a new socket at the same path. The hub retries every ``retry``
seconds (each attempt bounded by ``connect_timeout``) while viewers are attached, so it
reconnects by itself after a restart, and closes the connection when the last viewer
detaches. A connection that ends within ``settle`` seconds without a byte is taken for
the socket of a QEMU that is exiting (it accepts the next client while it shuts down)
and passed over silently. Closing never affects the VM (the chardev is ``server=on,wait=off``) nor
QEMU's console log file. Reading guest output has no deadline (a console waits for the
guest by nature); writes to the guest time out after ``write_timeout``.

A viewer that does not keep up (more than ``max_pending`` bytes queued) is detached
with a reason rather than slowing QEMU down: a serial port that is not drained stalls
the guest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 4096
RETRY = 0.25
SETTLE = 0.2  # a connection that closes within this, silent, was to an exiting QEMU
CONNECT_TIMEOUT = 2.0
WRITE_TIMEOUT = 5.0
MAX_PENDING = 1024 * 1024


class AttachMode(enum.StrEnum):
    WRITE = "write"
    READ_ONLY = "read-only"
    FORCE = "force"


class _Link(enum.Enum):
    STARTING = "starting"  # the first connection attempt is under way
    UP = "up"
    DOWN = "down"  # waiting for the socket (the VM is not running, or restarting)


class Role(enum.StrEnum):
    WRITER = "writer"
    READER = "reader"


@dataclass(frozen=True)
class Notice:
    """Something a viewer should know, sent between output chunks.

    ``event`` is one of ``attached``, ``role``, ``connected``, ``waiting``,
    ``disconnected``, ``input-ignored``, ``input-dropped`` and ``closed``.
    """

    event: str
    detail: str = ""
    role: Role | None = None


class ConsoleViewer:
    """One attached client: its role and the queue of output and notices for it."""

    def __init__(self, hub: ConsoleHub, number: int, mode: AttachMode) -> None:
        self.hub = hub
        self.number = number
        self.mode = mode
        self.role = Role.READER
        self.closed_reason: str | None = None
        self._queue: collections.deque[bytes | Notice] = collections.deque()
        self._pending = 0
        self._ready = asyncio.Event()
        self._told_ignored = False

    @property
    def wants_write(self) -> bool:
        return self.mode is not AttachMode.READ_ONLY

    @property
    def attached(self) -> bool:
        return self.closed_reason is None

    def _push(self, item: bytes | Notice) -> None:
        if self.closed_reason is not None:
            return
        if isinstance(item, bytes):
            self._pending += len(item)
        self._queue.append(item)
        self._ready.set()

    async def receive(self) -> bytes | Notice | None:
        """The next output chunk or notice; None once the viewer is detached and its
        queue is drained (``closed_reason`` says why)."""
        while not self._queue:
            if self.closed_reason is not None:
                return None
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if isinstance(item, bytes):
            self._pending -= len(item)
        return item

    async def write(self, data: bytes) -> bool:
        """Send ``data`` to the guest if this viewer is the writer; False if not."""
        return await self.hub.write(self, data)

    def detach(self) -> None:
        self.hub.detach(self)


class ConsoleHub:
    def __init__(
        self,
        name: str,
        socket_path: Path,
        *,
        exists: Callable[[], bool] = lambda: True,
        on_idle: Callable[[ConsoleHub], None] | None = None,
        retry: float = RETRY,
        settle: float = SETTLE,
        connect_timeout: float = CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.name = name
        self.socket_path = socket_path
        self._exists = exists
        self._on_idle = on_idle
        self._retry = retry
        self._settle = settle
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
        self._max_pending = max_pending
        self._viewers: list[ConsoleViewer] = []  # in attach order
        self._numbers = itertools.count(1)
        self._pump: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._link = _Link.STARTING
        self._write_lock = asyncio.Lock()

    # -- viewers --------------------------------------------------------------------

    @property
    def viewers(self) -> list[ConsoleViewer]:
        return list(self._viewers)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def writer(self) -> ConsoleViewer | None:
        return next((v for v in self._viewers if v.role is Role.WRITER), None)

    def attach(self, mode: AttachMode = AttachMode.WRITE) -> ConsoleViewer:
        viewer = ConsoleViewer(self, next(self._numbers), mode)
        self._viewers.append(viewer)
        current = self.writer()
        if mode is AttachMode.FORCE and current is not None:
            self._set_role(current, Role.READER,
                           f"viewer {viewer.number} took over the console input")
            current = None
        if current is None and viewer.wants_write:
            viewer.role = Role.WRITER
        viewer._push(Notice("attached", self._role_text(viewer), viewer.role))
        if self._pump is None or self._pump.done():
            self._link = _Link.STARTING
            self._pump = asyncio.create_task(self._run(), name=f"console-{self.name}")
        # While STARTING, the first connection attempt tells everyone how it went.
        if self._link is _Link.UP:
            viewer._push(Notice("connected", "the serial port is connected"))
        elif self._link is _Link.DOWN:
            viewer._push(Notice("waiting", self._waiting_text()))
        return viewer

    def detach(self, viewer: ConsoleViewer, reason: str = "detached") -> None:
        if viewer not in self._viewers:
            return
        self._viewers.remove(viewer)
        was_writer = viewer.role is Role.WRITER
        viewer.closed_reason = reason
        viewer._ready.set()
        if was_writer:
            successor = next((v for v in self._viewers if v.wants_write), None)
            if successor is not None:
                self._set_role(successor, Role.WRITER,
                               f"viewer {viewer.number} left: you have the console input")
        if not self._viewers:
            self._stop()
            if self._on_idle is not None:
                self._on_idle(self)

    def _set_role(self, viewer: ConsoleViewer, role: Role, why: str) -> None:
        viewer.role = role
        viewer._told_ignored = False
        viewer._push(Notice("role", why, role))

    def _role_text(self, viewer: ConsoleViewer) -> str:
        if viewer.role is Role.WRITER:
            return f"attached to the serial console of {self.name} (you can type)"
        if viewer.mode is AttachMode.READ_ONLY:
            return f"attached read-only to the serial console of {self.name}"
        holder = self.writer()
        who = f"viewer {holder.number}" if holder else "another viewer"
        return (f"attached read-only to the serial console of {self.name}: {who} has the "
                "input (force-write takes it over)")

    def _waiting_text(self) -> str:
        return f"waiting for the serial port of {self.name} (is the VM running?)"

    def _broadcast(self, item: bytes | Notice) -> None:
        for viewer in list(self._viewers):
            viewer._push(item)
            if viewer._pending > self._max_pending:
                self.detach(viewer, "too slow: the viewer did not keep up with the output")

    # -- input ----------------------------------------------------------------------

    async def write(self, viewer: ConsoleViewer, data: bytes) -> bool:
        if viewer.role is not Role.WRITER or viewer not in self._viewers:
            if not viewer._told_ignored:
                viewer._told_ignored = True
                viewer._push(Notice("input-ignored", "input ignored: you are read-only",
                                    viewer.role))
            return False
        async with self._write_lock:
            stream = self._writer
            if stream is None:
                viewer._push(Notice("input-dropped", "input dropped: " + self._waiting_text()))
                return True
            try:
                stream.write(data)
                await asyncio.wait_for(stream.drain(), self._write_timeout)
            except TimeoutError:
                viewer._push(Notice("input-dropped", "input stalled: the guest is not "
                                    f"reading its serial port ({self._write_timeout:g} s)"))
            except (ConnectionError, OSError) as exc:
                viewer._push(Notice("input-dropped", f"input dropped: {exc}"))
        return True

    # -- the connection to QEMU -----------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=CHUNK * 16),
                self._connect_timeout,
            )
        except (OSError, TimeoutError):
            return None

    async def _run(self) -> None:
        while self._viewers:
            if not self._exists():
                for viewer in list(self._viewers):
                    viewer._push(Notice("closed", f"VM {self.name} was deleted"))
                    self.detach(viewer, f"VM {self.name} was deleted")
                return
            streams = await self._connect()
            if streams is None:
                if self._link is _Link.STARTING:
                    self._broadcast(Notice("waiting", self._waiting_text()))
                self._link = _Link.DOWN
                await asyncio.sleep(self._retry)
                continue
            reader, writer = streams
            try:
                first = await asyncio.wait_for(reader.read(CHUNK), self._settle)
            except TimeoutError:
                first = None  # quiet but alive: a real connection
            except OSError:
                first = b""
            except BaseException:
                writer.close()  # cancelled while settling: nobody keeps this connection
                raise
            if first == b"":
                # Closed at once: the socket of a QEMU that is exiting (it takes the next
                # client while it shuts down). Not worth a notice either way.
                writer.close()
                await asyncio.sleep(self._retry)
                continue
            self._writer = writer
            self._link = _Link.UP
            self._broadcast(Notice("connected", "the serial port is connected"))
            try:
                if first:
                    self._broadcast(first)
                while chunk := await reader.read(CHUNK):
                    self._broadcast(chunk)
            except OSError as exc:
                log.debug("serial console of %s: %s", self.name, exc)
            finally:
                if self._writer is writer:
                    self._writer = None
                    self._link = _Link.DOWN
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._broadcast(Notice("disconnected", f"the serial port of {self.name} closed "
                                   "(the VM stopped or restarts)"))

    def _stop(self) -> None:
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        self._pump = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def close(self, reason: str = "the host service is stopping") -> None:
        """Detach everyone and drop the connection (host service shutdown)."""
        pump = self._pump
        for viewer in list(self._viewers):
            viewer._push(Notice("closed", reason))
            self.detach(viewer, reason)
        self._stop()
        if pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
