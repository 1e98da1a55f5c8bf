"""The capabilities of a running machine beyond power: small typed interfaces.

A :class:`~hvstack.hypervisor.driver.Machine` offers each as a property
(``machine.devices``, ``machine.memory``, ``machine.migration``, ``machine.block_jobs``).
Each interface takes and returns frozen dataclasses, never raw QMP: the QEMU
implementations live in :mod:`hvstack.hypervisor.qemu.capabilities`, and the tests have
an in-memory fake of each (``tests/functional/fake_capabilities.py``). Node and device
names are the identities the machine was started with (``disk-<disk id>``,
``nic-<mac>``, ...: see :mod:`hvstack.hypervisor.spec`).

Errors: a request QEMU refuses is :class:`~hvstack.errors.HypervisorError` (its QMP
error class in ``data["qmp_class"]``); a wait that outlasts its timeout (a guest that
does not release a device) is :class:`~hvstack.errors.OperationTimeout`.

Example: hot-plugging a NIC on a tap device the host opened::

    await machine.devices.pass_fd(tap_fd, "tap-nic1")
    await machine.devices.add_netdev(NetdevSpec("net1", "tap", {"fd": "tap-nic1"}))
    await machine.devices.add_device(DeviceSpec("virtio-net-pci", "nic1",
                                                {"netdev": "net1", "mac": mac}))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Scalar = str | int | float | bool


def _no_properties() -> Mapping[str, Scalar]:
    return {}


# -- devices ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """A device to hot-plug: its QEMU driver, its id, and its properties."""

    driver: str  # "virtio-net-pci", "virtio-blk-pci", "scsi-hd", ...
    id: str
    properties: Mapping[str, Scalar] = field(default_factory=_no_properties)


@dataclass(frozen=True)
class NetdevSpec:
    """A network back end: ``type`` "tap" (``fd`` names a passed descriptor), "user", ..."""

    id: str
    type: str
    properties: Mapping[str, Scalar] = field(default_factory=_no_properties)


@dataclass(frozen=True)
class FdSetMember:
    """A descriptor added to one of QEMU's fd sets; options open it as :attr:`path`."""

    fdset: int
    fd: int  # its number inside QEMU

    @property
    def path(self) -> str:
        return f"/dev/fdset/{self.fdset}"


class Devices(Protocol):
    """Hot plug of devices and network back ends, and file descriptors for them."""

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of ``fd`` under ``name`` (for ``fd=name``, ``fd:name``)."""
        ...

    async def close_fd(self, name: str) -> None: ...

    async def add_fd(self, fd: int, fdset: int | None = None, opaque: str = "") -> FdSetMember:
        """Add a copy of ``fd`` to an fd set (a new one when ``fdset`` is None)."""
        ...

    async def remove_fdset(self, fdset: int) -> None: ...

    async def add_device(self, device: DeviceSpec) -> None: ...

    async def remove_device(self, device_id: str, timeout: float) -> None:
        """Ask the guest to release the device; return once QEMU has deleted it.

        OperationTimeout if the guest has not released it within ``timeout`` (the
        request stays pending in QEMU, as with a real PCI button press);
        HypervisorError if the guest refused.
        """
        ...

    async def add_netdev(self, netdev: NetdevSpec) -> None:
        """Add a network back end; a tap's ``fd`` property may name a descriptor given
        with :meth:`pass_fd`, which the netdev then owns (the name is used up)."""
        ...

    async def remove_netdev(self, netdev_id: str) -> None: ...

    async def set_link(self, name: str, up: bool) -> None:
        """Put the link of the network adapter (or netdev) ``name`` up or down: the
        guest sees its cable plugged in or pulled out."""
        ...

    async def device_ids(self) -> tuple[str, ...]:
        """The id of every device of the machine that has one."""
        ...

    async def devices_on(self, bus: str) -> tuple[str, ...]:
        """The ids of the devices plugged into the bus of the bridge or PCIe root
        port with id ``bus`` (a device whose removal is pending is still there)."""
        ...

    async def root_bus_slots(self) -> Mapping[int, str]:
        """The slots of the machine's root PCI bus that hold a device, each with the
        id of its device ("" for one without an id: the host bridge, the PIIX)."""
        ...


# -- memory -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalloonStats:
    """The guest's own memory figures from the balloon driver (None: not reported)."""

    last_update: int  # seconds since the epoch; 0 before the guest's first report
    total: int | None = None
    free: int | None = None
    available: int | None = None
    disk_caches: int | None = None
    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None


@dataclass(frozen=True)
class MemoryDeviceSize:
    """A virtio-mem device: what is plugged into the guest now (``plugged``), what it
    was asked for (``requested``) and the most it can hold (``maximum``), in bytes."""

    plugged: int
    requested: int
    maximum: int


class Memory(Protocol):
    """Dynamic memory: the balloon's target and the guest's statistics, virtio-mem."""

    async def set_balloon_target(self, size: int) -> None:
        """Ask the guest to give back memory until it has ``size`` bytes."""
        ...

    async def balloon_size(self) -> int:
        """The memory the guest has now, in bytes."""
        ...

    async def set_stats_interval(self, seconds: int) -> None:
        """How often the guest reports :class:`BalloonStats` (0: never)."""
        ...

    async def balloon_stats(self) -> BalloonStats: ...

    async def set_memory_device_size(self, device_id: str, size: int) -> None:
        """Ask a virtio-mem device to plug or unplug memory until it holds ``size``."""
        ...

    async def memory_devices(self) -> Mapping[str, MemoryDeviceSize]:
        """Each virtio-mem device of the machine by id, with its sizes."""
        ...


# -- migration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationParameters:
    """Migration tuning; None leaves QEMU's current value."""

    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None  # bytes per second
    multifd_channels: int | None = None


@dataclass(frozen=True)
class MigrationStats:
    """``query-migrate`` as data: where a migration (or a save or restore) stands."""

    status: str  # "none", "setup", "active", "completed", "failed", "cancelled", ...
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def percent(self) -> float | None:
        """RAM sent so far, 0..100 (None before the total is known)."""
        if self.status == "completed":
            return 100.0
        if not self.ram_total:
            return None
        return min(100.0, 100.0 * self.ram_transferred / self.ram_total)


class Migration(Protocol):
    """QEMU's migration stream, to another host or to a file descriptor."""

    async def set_capabilities(self, capabilities: Mapping[str, bool]) -> None: ...
    async def set_parameters(self, parameters: MigrationParameters) -> None: ...

    async def start(self, uri: str) -> None:
        """Start sending the machine to ``uri`` ("fd:NAME", "unix:PATH", "tcp:H:P")."""
        ...

    async def incoming(self, uri: str) -> None:
        """Receive a machine started with ``-incoming defer`` from ``uri``."""
        ...

    async def stats(self) -> MigrationStats: ...
    async def cancel(self) -> None: ...


# -- block jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockNodeSpec:
    """A block node to add at run time: a format node over a file (an overlay, a target).

    ``backing`` is the node name of its backing node; None opens it with no backing
    (an overlay that :meth:`BlockJobs.snapshot` will put on top of a node).
    """

    node_name: str
    format: str  # "qcow2", "raw"
    filename: str
    backing: str | None = None
    read_only: bool = False


@dataclass(frozen=True)
class Snapshot:
    """Put the empty overlay node ``overlay`` on top of ``node`` (an external snapshot)."""

    node: str
    overlay: str


@dataclass(frozen=True)
class DirtyBitmap:
    node: str
    name: str
    persistent: bool = True


@dataclass(frozen=True)
class BlockJobInfo:
    job_id: str
    type: str  # "mirror", "commit", "stream", "backup"
    status: str  # "running", "ready", "paused", "concluded", ...
    offset: int
    length: int
    speed: int = 0
    ready: bool = False
    error: str | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.offset / self.length if self.length else 0.0


@dataclass(frozen=True)
class Backup:
    """Copy what ``node`` holds at the instant the job starts into the node ``target``
    (point in time: the guest's later writes first copy the old data). ``sync`` "top"
    copies only ``node``'s own layer, "full" the whole chain flattened."""

    job_id: str
    node: str
    target: str
    sync: str = "top"


@dataclass(frozen=True)
class NbdExport:
    """Serve ``node`` over NBD under ``name`` (the export id is the name)."""

    node: str
    name: str
    writable: bool = False


@dataclass(frozen=True)
class BlockIoStats:
    """What the guest read and wrote through one block device since QEMU started
    (counters of the device, so a snapshot or a mirror switch underneath keeps them)."""

    device: str  # the device's id ("disk-<disk id>-dev"); a device without one: its path
    read_bytes: int
    write_bytes: int


class BlockJobs(Protocol):
    """Snapshots, mirror, commit and stream jobs, dirty bitmaps and NBD exports; the
    devices' I/O counters (:meth:`io_stats`).

    Jobs run in QEMU; their progress arrives as ``JOB_STATUS_CHANGE`` events and
    :meth:`jobs`. A job id names one job for its whole life. Jobs are not dismissed by
    QEMU when they end: a concluded job stays in :meth:`jobs` with its error until
    :meth:`dismiss` (so a service that was down while it ended still learns how), and
    :func:`hvstack.storage.block_jobs.run_job` waits for one and dismisses it.
    """

    async def add_node(self, node: BlockNodeSpec) -> None: ...
    async def remove_node(self, node_name: str) -> None: ...

    async def snapshot(self, snapshots: Sequence[Snapshot],
                       bitmaps: Sequence[DirtyBitmap] = ()) -> None:
        """Take every snapshot and add every bitmap at one instant (a transaction)."""
        ...

    async def mirror(self, job_id: str, node: str, target: str, sync: str = "full",
                     write_blocking: bool = False, speed: int = 0) -> None:
        """Copy ``node`` into the node ``target`` until both hold the same and stay so;
        the job is then ready, and :meth:`complete` switches the device to ``target``.
        ``write_blocking``: guest writes go to both at once, so the job converges under
        any write load (at the cost of write latency). ``speed``: bytes per second at
        most for the background copy (0: no limit)."""
        ...

    async def backup(self, backups: Sequence[Backup]) -> None:
        """Start every backup job at one instant (a transaction)."""
        ...

    async def commit(self, job_id: str, node: str, top: str | None = None,
                     base: str | None = None, backing_file: str | None = None) -> None:
        """Merge ``top`` (default: the active layer of ``node``) down into ``base``.
        ``backing_file``: the name the node above ``top`` records for its new backing
        file (an intermediate commit; by default QEMU would write its own name of the
        base node, a ``json:`` pseudo-filename for a node given its backing)."""
        ...

    async def writable(self, node: str) -> None:
        """Let a job write node ``node`` although the machine opened it read-only (a
        parent at launch: its protocol node is reopened to become writable when a
        writer needs it); nothing for a node that was never read-only."""
        ...

    async def stream(self, job_id: str, node: str, base: str | None = None) -> None:
        """Copy the data of ``node``'s backing chain above ``base`` into ``node``."""
        ...

    async def jobs(self) -> list[BlockJobInfo]: ...

    async def node_files(self) -> dict[str, str]:
        """The file of every named format node: node name -> filename."""
        ...

    async def top_nodes(self) -> frozenset[str]:
        """The node each block device reads and writes now (the top of its chain)."""
        ...

    async def io_stats(self) -> tuple[BlockIoStats, ...]:
        """The bytes read and written through each block device (``query-blockstats``)."""
        ...

    async def complete(self, job_id: str) -> None: ...
    async def cancel(self, job_id: str, force: bool = False) -> None: ...

    async def dismiss(self, job_id: str) -> None: ...

    async def add_bitmap(self, bitmap: DirtyBitmap) -> None: ...
    async def remove_bitmap(self, node: str, name: str) -> None: ...

    async def start_nbd_server(self, socket_path: str) -> None: ...
    async def add_export(self, export: NbdExport) -> None: ...
    async def remove_export(self, name: str) -> None: ...
    async def stop_nbd_server(self) -> None: ...
