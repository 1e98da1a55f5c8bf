"""The QMP monitor of one QEMU process, on top of ``qemu.qmp``.

Every call has a timeout. Errors from QEMU become :class:`HypervisorError` carrying
QEMU's error class; a lost connection becomes :class:`HypervisorError` too, so callers
handle one error type. Events are read by the owner through :meth:`Monitor.events`.

While :meth:`Monitor.connect` retries (QEMU is still creating its socket, which is
expected), ``qemu.qmp``'s own ERROR lines for each failed attempt are demoted to DEBUG;
a connection that never comes is the caller's error to report, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.events import QmpEvent

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 30.0

_connecting = contextvars.ContextVar("hvstack_qmp_connecting", default=False)


class _QuietConnectAttempts(logging.Filter):
    """Demote qemu.qmp's "Failed to establish ..." lines logged inside connect()."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (_connecting.get() and args and str(args[0]).startswith("Failed to establish")):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_QUIET = _QuietConnectAttempts()


class Monitor:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        # qemu.qmp logs to a logger of its own per client name; addFilter adds it once.
        self._client.logger.addFilter(_QUIET)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._fd_lock = asyncio.Lock()
        self.name = name

    async def connect(self, socket_path: str, timeout: float = CONNECT_TIMEOUT,
                      retry: float = 0.05) -> None:
        """Connect, retrying every ``retry`` seconds while QEMU creates its socket."""
        deadline = asyncio.get_running_loop().time() + timeout
        token = _connecting.set(True)
        try:
            while True:
                try:
                    await asyncio.wait_for(self._client.connect(socket_path), timeout)
                    return
                except (QMPError, OSError, TimeoutError) as exc:
                    if asyncio.get_running_loop().time() >= deadline:
                        raise HypervisorError(
                            f"cannot reach the QMP monitor of {self.name}: {exc}"
                        ) from exc
                    await asyncio.sleep(retry)
        finally:
            _connecting.reset(token)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise HypervisorError(
                f"QEMU refused {command}: {exc.error.error.desc}",
                qmp_class=exc.error.error.class_,
            ) from exc
        except TimeoutError as exc:
            raise OperationTimeout(f"QEMU did not answer {command} within {timeout:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError(f"lost the QMP monitor of {self.name}: {exc}") from exc

    async def send_fd(self, fd: int, fdname: str) -> None:
        """Hand QEMU an open file descriptor under ``fdname`` (QMP getfd)."""
        await self.execute_with_fd(fd, "getfd", {"fdname": fdname})

    async def execute_with_fd(self, fd: int, command: str, arguments: dict[str, Any]) -> Any:
        """Send ``fd`` (SCM_RIGHTS) and run the command that takes it (getfd, add-fd).

        One at a time: QEMU gives a command the descriptors that arrived before it.
        """
        async with self._fd_lock:
            try:
                self._client.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise HypervisorError(f"cannot pass a file to {self.name}: {exc}") from exc
            return await self.execute(command, arguments)

    async def events(self) -> AsyncIterator[QmpEvent]:
        async for event in self._listener:
            yield QmpEvent.from_message(dict(event))

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await asyncio.wait_for(self._client.disconnect(), 5)
