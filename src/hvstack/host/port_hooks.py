"""Every start and stop of a VM, as the network sees it (the service's StartHook).

Just before a VM starts, :class:`PortHooks` opens a tap for each of its adapters in
switch mode (through the network backend, on the port plan of
:class:`~hvstack.host.network_ops.NetworkOperations`) and gives the descriptors to its
machine spec; once the start left Starting (successful or not) it closes the host's
copies, so the taps live exactly as long as QEMU holds them. A start refused by a later
check closes the ports again. When a VM stops (Off, Saved) its ports' rules are removed
in the background; a start of the same VM waits for that first. A machine starts with
every cable in: the links of adapters that are not connected are put down after the
start, and mirror sources on the switches where the VM has a mirror destination are
planned again when it starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from hvstack.compute import nics
from hvstack.compute.model import SWITCH_MODE, VmRecord, VmState
from hvstack.errors import HvError
from hvstack.network.model import MirrorMode

if TYPE_CHECKING:
    from hvstack.host.network_ops import NetworkOperations

log = logging.getLogger(__name__)


class PortHooks:
    def __init__(self, network: NetworkOperations) -> None:
        self.network = network
        self._fds: dict[str, dict[str, int]] = {}  # VM id -> MAC -> tap fd for QEMU
        self._closing: dict[str, asyncio.Task[None]] = {}  # VM id -> its ports closing
        self._tasks: set[asyncio.Task[None]] = set()

    async def before_start(self, record: VmRecord) -> None:
        self._release_fds(record.id)
        nics = [n for n in record.config.network_adapters if n.mode == SWITCH_MODE]
        if not nics:
            return
        self.network.require(f"start VM '{record.name}' with an adapter on a switch")
        await self.network.ready.wait()
        pending = self._closing.get(record.id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await pending
        fds: dict[str, int] = {}
        try:
            for nic in nics:
                fds[nic.mac] = await self.network.backend_for("open a port").open_port(
                    self.network.port_plan(record.id, record.name, nic))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            await self.network.close_ports(record.id, [n.mac for n in nics])
            raise
        self._fds[record.id] = fds

    def start_aborted(self, record: VmRecord) -> None:
        self._release_fds(record.id)
        self._schedule_close(record)

    def tap_fds(self, record: VmRecord) -> dict[str, int]:
        """The taps opened for a starting VM. A spec built at another time (to name a
        running VM's block nodes) is never launched: its taps are -1."""
        held = self._fds.get(record.id, {})
        return {nic.mac: held.get(nic.mac, -1) for nic in record.config.network_adapters
                if nic.mode == SWITCH_MODE}

    def on_state(self, record: VmRecord) -> None:
        if record.state is not VmState.STARTING:
            started = bool(self._fds.get(record.id)) and record.state is VmState.RUNNING
            self._release_fds(record.id)  # QEMU has them, or never will
            if started:
                self._spawn_links(record)
                self._spawn(self.network.refresh_mirrors(_destinations(record)), record)
        if record.state in (VmState.OFF, VmState.SAVED):
            self._schedule_close(record)
            self._spawn(self.network.refresh_mirrors(_destinations(record)), record)

    def _spawn(self, coro: Coroutine[Any, Any, None], record: VmRecord) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"network-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_links(self, record: VmRecord) -> None:
        """A machine starts with every cable in: put down the links of adapters that
        are not connected."""
        if all(nics.link_up(n) for n in record.config.network_adapters):
            return

        async def links() -> None:
            try:
                machine = self.network.service.get_vm(record.id).running_machine()
                await nics.apply_links(machine.devices, record.config.network_adapters)
            except HvError as exc:
                log.error("VM %s: cannot put down the links of unconnected adapters: %s",
                          record.name, exc)

        self._spawn(links(), record)

    def _release_fds(self, vm_id: str) -> None:
        for fd in self._fds.pop(vm_id, {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _schedule_close(self, record: VmRecord) -> None:
        macs = [n.mac for n in record.config.network_adapters if n.mode == SWITCH_MODE]
        if not macs or self.network.unavailable is not None:
            return
        previous = self._closing.get(record.id)

        async def close() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await self.network.close_ports(record.id, macs)

        task = asyncio.get_running_loop().create_task(close(), name=f"close-ports-{record.id}")
        self._closing[record.id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._closing.get(record.id) is done:
                del self._closing[record.id]

        task.add_done_callback(forget)

    async def close(self) -> None:
        """Wait for ports being closed (the service stops)."""
        for task in [*self._closing.values(), *self._tasks]:
            with contextlib.suppress(Exception):
                await task


def _destinations(record: VmRecord) -> list[str]:
    """The switches on which ``record`` has the mirror destination port."""
    return [n.switch for n in record.config.network_adapters
            if n.mode == SWITCH_MODE and n.switch
            and n.port.mirror is MirrorMode.DESTINATION]


