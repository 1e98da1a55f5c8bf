"""A fake QEMU monitor at the wire: an asyncio unix socket server that speaks QMP.

:class:`FakeQmp` listens on a unix socket and behaves as QEMU's QMP server does: it sends
the greeting, requires ``qmp_capabilities`` first, answers each ``execute`` with
``return`` or ``error`` (echoing ``id``), sends events, and receives file descriptors
passed with SCM_RIGHTS (``getfd``, ``add-fd``). It reads the socket itself (asyncio
streams cannot receive ancillary data), so the client under test is the real
``qemu.qmp`` client inside :class:`hvstack.hypervisor.qemu.monitor.Monitor`.

Scripting:

* :meth:`FakeQmp.reply` queues answers for a command (a value, or :class:`QmpFailure`
  for an error); the last one repeats. :meth:`FakeQmp.on` sets a handler that computes
  the answer from the arguments. Commands without either get the built-in behaviour
  (``query-status``, ``stop``/``cont`` with their events, ``quit``, ``getfd``, ...).
* :meth:`FakeQmp.hang` makes a command never answer (timeouts); :meth:`FakeQmp.emit`
  sends an event to every connected client.
* ``commands`` records every command received as ``(name, arguments)``; ``fds`` holds
  the descriptors received by name (``getfd``) or by fdset (``add-fd``); the test owns
  and closes them through :meth:`FakeQmp.close`.
* ``greeting_delay`` holds the greeting back (the connect race: QEMU creates the socket
  before it is ready); :meth:`FakeQmp.start` with ``listen_after`` creates the socket
  late.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], Any]

# Commands that, unscripted, just succeed (their effects are the test's to script).
ACCEPTED = frozenset({
    "migrate", "migrate_cancel", "migrate-incoming", "migrate-set-capabilities",
    "migrate-set-parameters", "device_add", "netdev_add", "netdev_del", "balloon",
    "qom-set", "block-job-cancel", "job-complete", "job-dismiss", "transaction",
    "blockdev-add", "blockdev-del", "blockdev-mirror", "block-commit", "block-stream",
    "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "nbd-server-start",
    "nbd-server-stop", "block-export-add", "block-export-del", "screendump",
})

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "fake"}, "capabilities": []}}


@dataclass(frozen=True)
class QmpFailure:
    """An error answer: QEMU's error class and description."""

    desc: str
    error_class: str = "GenericError"


class _Connection:
    def __init__(self, server: FakeQmp, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self._ready: asyncio.Future[None] | None = None
        self.buffer = ""
        self.pending_fds: list[int] = []
        self.negotiated = False
        self.closed = False

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._ready = ready

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    async def _receive(self) -> bool:
        """Read what is there; False at end of stream."""
        await self._readable()
        if self.closed:
            return False
        fds = array.array("i")
        try:
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fds.itemsize
                fds.frombytes(payload[:usable])
        self.pending_fds.extend(fds)
        if not data:
            return False
        self.buffer += data.decode()
        return True

    def _messages(self) -> list[dict[str, Any]]:
        decoder = json.JSONDecoder()
        found: list[dict[str, Any]] = []
        while True:
            text = self.buffer.lstrip()
            if not text:
                self.buffer = ""
                return found
            try:
                message, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                self.buffer = text
                return found
            self.buffer = text[end:]
            found.append(message)

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(
                self.sock, json.dumps(message).encode() + b"\r\n"
            )

    async def serve(self) -> None:
        try:
            if self.server.greeting_delay:
                await asyncio.sleep(self.server.greeting_delay)
            await self.send(GREETING)
            while not self.closed and await self._receive():
                for message in self._messages():
                    await self._answer(message)
        finally:
            self.close()

    async def _answer(self, message: dict[str, Any]) -> None:
        command = str(message.get("execute", ""))
        arguments = dict(message.get("arguments") or {})
        ident = {"id": message["id"]} if "id" in message else {}
        if not self.negotiated:
            if command != "qmp_capabilities":
                await self.send({"error": {"class": "CommandNotFound", "desc":
                                           "Expecting capabilities negotiation"}, **ident})
                return
            self.negotiated = True
            await self.send({"return": {}, **ident})
            return
        self.server.commands.append((command, arguments))
        if command in self.server.hanging:
            return
        try:
            answer = self.server.answer(self, command, arguments)
        except QmpFailureError as exc:
            answer = exc.failure
        if isinstance(answer, QmpFailure):
            await self.send({"error": {"class": answer.error_class, "desc": answer.desc},
                             **ident})
        else:
            await self.send({"return": {} if answer is None else answer, **ident})
        if command == "quit":
            self.close()
            self.server.on_quit()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.fd)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            with contextlib.suppress(OSError):
                self.sock.close()
        for fd in self.pending_fds:
            os.close(fd)
        self.pending_fds.clear()


class QmpFailureError(Exception):
    """Raise from a handler to answer with an error."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.failure = QmpFailure(desc, error_class)


class FakeQmp:
    """One fake QEMU monitor on ``path``. Use as an async context manager."""

    def __init__(self, path: Path | str, *, status: str = "running") -> None:
        self.path = str(path)
        self.status = status
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.fds: dict[str, int] = {}
        self.fdsets: dict[int, list[int]] = {}
        self.hanging: set[str] = set()
        self.greeting_delay = 0.0
        self.quit_received = asyncio.Event()
        self.quit_hook: Callable[[], None] | None = None
        self._scripts: dict[str, list[Any]] = {}
        self._handlers: dict[str, Handler] = {}
        self._connections: list[_Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    # -- scripting ----------------------------------------------------------------

    def reply(self, command: str, *answers: Any) -> None:
        """Answer ``command`` with each of ``answers`` in turn; the last one repeats."""
        self._scripts[command] = list(answers)

    def on(self, command: str, handler: Handler) -> None:
        """Answer ``command`` with ``handler(arguments)`` (raise QmpFailureError to fail)."""
        self._handlers[command] = handler

    def hang(self, command: str) -> None:
        self.hanging.add(command)

    async def emit(self, event: str, data: dict[str, Any] | None = None,
                   timestamp: float | None = None) -> None:
        when = time.time() if timestamp is None else timestamp
        message: dict[str, Any] = {
            "event": event,
            "timestamp": {"seconds": int(when), "microseconds": int(when % 1 * 1e6)},
        }
        if data is not None:
            message["data"] = data
        for connection in list(self._connections):
            await connection.send(message)

    def sent(self, command: str) -> list[dict[str, Any]]:
        """The arguments of every ``command`` received, in order."""
        return [args for name, args in self.commands if name == command]

    @property
    def connections(self) -> int:
        return sum(1 for c in self._connections if not c.closed)

    # -- answers --------------------------------------------------------------------

    def answer(self, connection: _Connection, command: str, args: dict[str, Any]) -> Any:
        if command in self._handlers:
            return self._handlers[command](args)
        script = self._scripts.get(command)
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        if command in ACCEPTED:
            return None
        builtin = getattr(self, "_do_" + command.replace("-", "_"), None)
        if builtin is None:
            return QmpFailure(f"The command {command} has not been found", "CommandNotFound")
        return builtin(connection, args)

    def _do_query_status(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        return {"status": self.status, "running": self.status == "running",
                "singlestep": False}

    def _do_stop(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        self.status = "paused"
        self.later(self.emit("STOP"))

    def _do_cont(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        self.status = "running"
        self.later(self.emit("RESUME"))

    def _do_system_powerdown(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        self.later(self.emit("POWERDOWN"))

    def _do_system_reset(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        self.later(self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"}))

    def _do_quit(self, _c: _Connection, _a: dict[str, Any]) -> Any:
        return None

    def _do_getfd(self, connection: _Connection, args: dict[str, Any]) -> Any:
        if not connection.pending_fds:
            return QmpFailure("No file descriptor supplied via SCM_RIGHTS")
        name = str(args["fdname"])
        if name in self.fds:
            os.close(self.fds[name])
        self.fds[name] = connection.pending_fds.pop(0)
        return None

    def _do_closefd(self, _c: _Connection, args: dict[str, Any]) -> Any:
        fd = self.fds.pop(str(args["fdname"]), None)
        if fd is None:
            return QmpFailure(f"File descriptor named '{args['fdname']}' not found")
        os.close(fd)
        return None

    def _do_add_fd(self, connection: _Connection, args: dict[str, Any]) -> Any:
        if not connection.pending_fds:
            return QmpFailure("No file descriptor supplied via SCM_RIGHTS")
        fdset = int(args.get("fdset-id", max(self.fdsets, default=-1) + 1))
        fd = connection.pending_fds.pop(0)
        self.fdsets.setdefault(fdset, []).append(fd)
        return {"fdset-id": fdset, "fd": fd}

    def _do_remove_fd(self, _c: _Connection, args: dict[str, Any]) -> Any:
        fds = self.fdsets.pop(int(args["fdset-id"]), None)
        if fds is None:
            return QmpFailure(f"File descriptor set {args['fdset-id']} not found")
        for fd in fds:
            os.close(fd)
        return None

    def later(self, coro: Any) -> None:
        """Run ``coro`` (an :meth:`emit`) after the current answer is sent, as QEMU does."""
        task = asyncio.get_running_loop().create_task(self._after(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _after(coro: Any) -> None:
        await asyncio.sleep(0)
        await coro

    def on_quit(self) -> None:
        self.quit_received.set()
        if self.quit_hook is not None:
            self.quit_hook()

    # -- lifetime ---------------------------------------------------------------------

    async def start(self, listen_after: float = 0.0) -> FakeQmp:
        if listen_after:
            await asyncio.sleep(listen_after)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(4)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))
        return self

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            connection = _Connection(self, sock)
            self._connections.append(connection)
            task = loop.create_task(connection.serve())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def drop_connections(self) -> None:
        """The monitor goes away (QEMU crashed) without answering."""
        for connection in self._connections:
            connection.close()

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fd in [*self.fds.values(), *(f for fds in self.fdsets.values() for f in fds)]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.fdsets.clear()

    async def __aenter__(self) -> FakeQmp:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()
