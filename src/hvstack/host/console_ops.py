"""Consoles of the host's VMs: the serial console, the graphical console (VNC), screenshots.

:class:`ConsoleOperations` keeps one :class:`~hvstack.host.console_hub.ConsoleHub` per
VM that has viewers attached (keyed by the VM's id, so a rename does not matter), opens
connections to a VM's VNC socket for the API's WebSocket bridge, and takes screenshots:
QEMU dumps the display as PPM into the VM's run directory, the file is read and removed,
and :mod:`hvstack.pixmap` turns it into a PNG (optionally shrunk to a thumbnail) in a
worker thread, off the event loop.

The graphical console and screenshots need a VM process (Running or Paused); the serial
console does not: a viewer may attach to a VM that is Off and sees it boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

from hvstack import pixmap
from hvstack.compute.lifecycle import VmController
from hvstack.compute.states import Operation
from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.host.console_hub import AttachMode, ConsoleHub, ConsoleViewer
from hvstack.host.service import HostService

log = logging.getLogger(__name__)

VNC_CONNECT_TIMEOUT = 5.0


class ConsoleOperations:
    def __init__(self, service: HostService) -> None:
        self._service = service
        self._hubs: dict[str, ConsoleHub] = {}

    # -- serial console ---------------------------------------------------------------

    def attach_serial(self, ref: str, mode: AttachMode = AttachMode.WRITE) -> ConsoleViewer:
        """Attach a viewer to the VM's serial console (see :mod:`console_hub` for roles).

        The caller must :meth:`ConsoleViewer.detach` it when its client goes away.
        """
        vm = self._service.get_vm(ref)
        vm_id = vm.record.id
        hub = self._hubs.get(vm_id)
        if hub is None:
            hub = ConsoleHub(
                vm.record.name, vm.files.serial_socket,
                exists=lambda: self._exists(vm_id), on_idle=self._forget,
            )
            self._hubs[vm_id] = hub
        return hub.attach(mode)

    def _exists(self, vm_id: str) -> bool:
        return any(vm.record.id == vm_id for vm in self._service.list_vms())

    def _forget(self, hub: ConsoleHub) -> None:
        for vm_id, known in list(self._hubs.items()):
            if known is hub:
                del self._hubs[vm_id]

    async def close(self) -> None:
        hubs, self._hubs = list(self._hubs.values()), {}
        for hub in hubs:
            await hub.close()

    # -- graphical console --------------------------------------------------------------

    def _live_vm(self, ref: str, operation: Operation) -> VmController:
        vm = self._service.get_vm(ref)
        vm.require(operation)
        return vm

    async def open_vnc(self, ref: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the VM's VNC server (its unix socket in the run directory)."""
        vm = self._live_vm(ref, Operation.OPEN_GRAPHICAL_CONSOLE)
        path = vm.files.vnc_socket
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(str(path)),
                                          VNC_CONNECT_TIMEOUT)
        except TimeoutError as exc:
            raise OperationTimeout(
                f"the VNC server of VM '{vm.record.name}' did not answer within "
                f"{VNC_CONNECT_TIMEOUT:g} s") from exc
        except OSError as exc:
            raise HypervisorError(
                f"cannot reach the VNC server of VM '{vm.record.name}': {exc}") from exc

    # -- screenshots ---------------------------------------------------------------------

    async def screenshot(self, ref: str, max_width: int | None = None) -> bytes:
        """The VM's display as PNG, at most ``max_width`` pixels wide when given."""
        vm = self._live_vm(ref, Operation.TAKE_SCREENSHOT)
        # Private until the compute layer exposes its worker handle; read-only use.
        machine = vm.running_machine()
        dump = vm.files.run_dir / f"screendump-{secrets.token_hex(6)}.ppm"
        try:
            await machine.screendump(dump)
            data = await asyncio.to_thread(_read_and_remove, dump)
        finally:
            with contextlib.suppress(OSError):
                dump.unlink()
        try:
            return await asyncio.to_thread(pixmap.ppm_to_png, data, max_width)
        except pixmap.ImageError as exc:
            raise HypervisorError(
                f"the screendump of VM '{vm.record.name}' is unreadable: {exc}") from exc


def _read_and_remove(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise HypervisorError(f"QEMU wrote no screendump at {path}") from exc
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
