"""The QEMU implementation of :class:`hvstack.hypervisor.driver.Driver`.

Saving and restoring state go through QEMU migration to a file descriptor that the host
service opens and passes over QMP (QEMU 7.2 has no ``file:`` migration, and ``exec:``
would run a shell).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from hvstack.errors import HypervisorError, InsufficientResources, OperationTimeout
from hvstack.hypervisor.events import EventSink
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.qemu.capabilities import (
    EventWaiters,
    QemuBlockJobs,
    QemuDevices,
    QemuMemory,
    QemuMigration,
)
from hvstack.hypervisor.qemu.monitor import Monitor
from hvstack.hypervisor.spec import MachineSpec
from hvstack.progress import Progress

log = logging.getLogger(__name__)

MIGRATION_POLL = 0.2
QUIT_TIMEOUT = 30.0
SCREENDUMP_TIMEOUT = 10.0


class QemuMachine:
    def __init__(self, vm_id: str, pid: int, monitor: Monitor, events: EventSink) -> None:
        self.vm_id = vm_id
        self.pid = pid
        self._monitor = monitor
        self._sink = events
        self._waiters = EventWaiters()
        self.devices = QemuDevices(monitor, self._waiters)
        self.memory = QemuMemory(monitor)
        self.migration = QemuMigration(monitor)
        self.block_jobs = QemuBlockJobs(monitor)
        self._reader = asyncio.create_task(self._read_events(), name=f"qmp-events-{vm_id}")

    async def _read_events(self) -> None:
        async for event in self._monitor.events():
            self._waiters.notify(event)
            try:
                self._sink(event)
            except Exception:
                log.exception("event handler failed for %s on %s", event.name, self.vm_id)

    async def status(self) -> str:
        reply = await self._monitor.execute("query-status")
        return str(reply["status"])

    async def pause(self) -> None:
        await self._monitor.execute("stop")

    async def resume(self) -> None:
        await self._monitor.execute("cont")

    async def power_button(self) -> None:
        await self._monitor.execute("system_powerdown")

    async def reset(self) -> None:
        await self._monitor.execute("system_reset")

    async def _wait_migration(self, progress: Progress, what: str) -> None:
        while True:
            stats = await self.migration.stats()
            if stats.status == "completed":
                progress(100.0, "")
                return
            if stats.status in ("failed", "cancelled"):
                desc = stats.error or stats.status
                if "No space left" in desc or "ENOSPC" in desc:
                    raise InsufficientResources(f"{what} failed: no space left on the disk")
                raise HypervisorError(f"{what} failed: {desc}")
            if stats.percent is not None:
                progress(min(99.0, stats.percent), "")
            await asyncio.sleep(MIGRATION_POLL)

    async def save_state(self, path: Path, progress: Progress) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await self._monitor.send_fd(fd, "savestate")
        finally:
            os.close(fd)
        await self.migration.start("fd:savestate")
        try:
            await self._wait_migration(progress, "saving the VM state")
        except BaseException:
            with contextlib.suppress(HypervisorError):
                await self.migration.cancel()
            raise

    async def restore_state(self, path: Path, progress: Progress) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._monitor.send_fd(fd, "loadstate")
        finally:
            os.close(fd)
        await self.migration.incoming("fd:loadstate")
        while True:
            # During an incoming migration query-migrate reports little; the run state
            # leaves "inmigrate" once the state is loaded.
            status = await self.status()
            if status != "inmigrate":
                break
            stats = await self.migration.stats()
            if stats.status == "failed":
                raise HypervisorError(f"restoring the saved state failed: {stats.error}")
            await asyncio.sleep(MIGRATION_POLL)
        if status not in ("paused", "running", "postmigrate"):
            raise HypervisorError(f"restoring the saved state left QEMU {status}")
        progress(100.0, "")

    async def screendump(self, path: Path) -> None:
        # PPM, QEMU's default: every QEMU build writes it (PNG needs libpng), and the
        # caller wants the pixels anyway to scale a thumbnail.
        await self._monitor.execute("screendump", {"filename": str(path)},
                                    timeout=SCREENDUMP_TIMEOUT)

    async def quit(self) -> None:
        with contextlib.suppress(HypervisorError, OperationTimeout):
            await self._monitor.execute("quit", timeout=5)
        try:
            await asyncio.wait_for(self.wait_exit(), QUIT_TIMEOUT)
        except TimeoutError:
            process.kill(self.pid, self.vm_id)
            await self.wait_exit()

    async def wait_exit(self) -> None:
        await process.wait_exit(self.pid, self.vm_id)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._monitor.close()


class QemuDriver:
    async def launch(self, spec: MachineSpec, pidfile: Path, events: EventSink) -> QemuMachine:
        monitor = Monitor(spec.vm_id)
        # Connect while QEMU is still initialising: its QMP socket listens before the
        # daemonizing parent exits, so the monitor is ready the moment QEMU is.
        connecting = asyncio.create_task(monitor.connect(spec.paths.qmp_socket, retry=0.005))
        try:
            pid = await process.launch(build_argv(spec), pidfile, pass_fds=spec.pass_fds)
        except BaseException:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                await connecting
            await monitor.close()
            raise
        try:
            await connecting
        except BaseException:
            process.kill(pid, spec.vm_id)
            raise
        return QemuMachine(spec.vm_id, pid, monitor, events)

    async def attach(
        self, vm_id: str, pid: int, qmp_socket: str, events: EventSink
    ) -> QemuMachine | None:
        if not process.is_vm_process(pid, vm_id):
            return None
        monitor = Monitor(vm_id)
        await monitor.connect(qmp_socket)
        return QemuMachine(vm_id, pid, monitor, events)
