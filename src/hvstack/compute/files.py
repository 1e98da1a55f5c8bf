"""Where the files of one VM live: its folder (settings copy, disks created for it,
saved state, firmware variables, QEMU's pidfile and console log) and its run directory
(the sockets of a running worker, gone when it stops).

Contract: :class:`VmFiles` only names paths (no I/O). The saved state of a Saved VM is
:attr:`VmFiles.saved_state`; beside it :attr:`VmFiles.saved_layout` keeps how the
adapters sat (see :func:`hvstack.compute.nics.save_layout`; a state saved by release
88d3ce2 has none); both go when the state is restored or discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VmFiles:
    """The files of one VM: its folder and its runtime sockets."""

    folder: Path
    run_dir: Path

    @property
    def checkpoint_dir(self) -> Path:
        """The memory states, adapter layouts and UEFI variables of its checkpoints."""
        return self.folder / "checkpoints"

    @property
    def saved_state(self) -> Path:
        return self.folder / "saved-state.bin"

    @property
    def saved_layout(self) -> Path:
        """How the adapters sat when the state was saved (written with every save)."""
        return self.folder / "saved-state.layout.json"

    @property
    def pidfile(self) -> Path:
        return self.folder / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.folder / "console.log"

    @property
    def efi_vars(self) -> Path:
        return self.folder / "efivars.fd"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        return self.run_dir / "qga.sock"

    @property
    def serial_socket(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.run_dir / "vnc.sock"
