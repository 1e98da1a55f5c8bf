"""In-memory fakes of the machine capabilities (:mod:`hvstack.hypervisor.capabilities`).

Each fake keeps what a test asserts on (devices, fds, balloon size, migration state,
block jobs, bitmaps, exports) and refuses what QEMU would refuse (a duplicate id, an
unknown one) with the same error types. :class:`FakeDevices` holds a device removal
until the test lets the guest release it (``auto_release`` False) to exercise timeouts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.capabilities import (
    Backup,
    BalloonStats,
    BlockIoStats,
    BlockJobInfo,
    BlockJobs,
    BlockNodeSpec,
    Devices,
    DeviceSpec,
    DirtyBitmap,
    FdSetMember,
    Memory,
    MemoryDeviceSize,
    Migration,
    MigrationParameters,
    MigrationStats,
    NbdExport,
    NetdevSpec,
    Snapshot,
)
from hvstack.hypervisor.spec import (
    MEMORY_DEVICE,
    MachineSpec,
    NicModel,
    TapNetdev,
    slot_address,
)


def _refuse(message: str, qmp_class: str = "GenericError") -> HypervisorError:
    return HypervisorError(f"QEMU refused: {message}", qmp_class=qmp_class)


@dataclass
class FakeDevices:
    devices: dict[str, DeviceSpec] = field(default_factory=dict)
    netdevs: dict[str, NetdevSpec] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)  # name -> our duplicate
    fdsets: dict[int, list[int]] = field(default_factory=dict)
    auto_release: bool = True  # the guest releases a device as soon as asked
    released: dict[str, asyncio.Event] = field(default_factory=dict)
    links: dict[str, bool] = field(default_factory=dict)  # set_link's last word by name
    netdev_fds: dict[str, int] = field(default_factory=dict)  # a tap netdev's descriptor
    buses: set[str] | None = None  # the machine's ports (None: any bus is there)
    # Root-bus slots held by devices this fake does not keep (host bridge, PIIX, ...);
    # a device added with an ``addr`` holds its slot too.
    fixed_slots: dict[int, str] = field(default_factory=lambda: {0: "", 1: ""})
    # Told the id of each device QEMU deletes (the machine sends DEVICE_DELETED).
    on_deleted: Callable[[str], None] | None = None
    waiting: set[str] = field(default_factory=set)  # removals a caller waits for

    @classmethod
    def of_spec(cls, spec: MachineSpec) -> FakeDevices:
        """The devices a machine started from ``spec`` has: its adapters and their
        netdevs, each on its root port (q35), and the spare ports."""
        fake = cls(buses={p.id for p in spec.root_ports()} if spec.root_ports() else None)
        for nic in spec.net_devices:
            backend = (NetdevSpec(nic.netdev_id, "tap", {"fd": nic.backend.fd})
                       if isinstance(nic.backend, TapNetdev) else NetdevSpec(nic.netdev_id, "user"))
            properties: dict[str, str | int | float | bool] = {"netdev": nic.netdev_id,
                                                               "mac": nic.mac}
            bus = spec.nic_bus(nic)
            if bus is not None:
                properties["bus"] = bus
            slot = spec.nic_slot(nic)
            if slot is not None:
                properties["addr"] = slot_address(slot)
            driver = "e1000" if nic.model is NicModel.E1000 else "virtio-net-pci"
            fake.netdevs[nic.netdev_id] = backend
            fake.devices[nic.id] = DeviceSpec(driver, nic.id, properties)
            fake.links[nic.id] = fake.links[nic.netdev_id] = True
        return fake

    async def pass_fd(self, fd: int, name: str) -> None:
        if name in self.fds:
            os.close(self.fds[name])
        self.fds[name] = os.dup(fd)

    async def close_fd(self, name: str) -> None:
        if name not in self.fds:
            raise _refuse(f"File descriptor named '{name}' not found")
        os.close(self.fds.pop(name))

    async def add_fd(self, fd: int, fdset: int | None = None, opaque: str = "") -> FdSetMember:
        chosen = max(self.fdsets, default=-1) + 1 if fdset is None else fdset
        copy = os.dup(fd)
        self.fdsets.setdefault(chosen, []).append(copy)
        return FdSetMember(chosen, copy)

    async def remove_fdset(self, fdset: int) -> None:
        if fdset not in self.fdsets:
            raise _refuse(f"File descriptor set {fdset} not found")
        for fd in self.fdsets.pop(fdset):
            os.close(fd)

    async def add_device(self, device: DeviceSpec) -> None:
        if device.id in self.devices:
            raise _refuse(f"Duplicate device ID '{device.id}'")
        netdev = device.properties.get("netdev")
        if netdev is not None and netdev not in self.netdevs:
            raise _refuse(f"Property 'netdev' can't find value '{netdev}'")
        if netdev is not None and any(d.properties.get("netdev") == netdev
                                      for d in self.devices.values()):
            raise _refuse(f"Property 'netdev' can't use value '{netdev}', it's in use")
        bus = device.properties.get("bus")
        if isinstance(bus, str) and self.buses is not None:
            if bus not in self.buses:
                raise _refuse(f"Bus '{bus}' not found")
            if any(d.properties.get("bus") == bus for d in self.devices.values()):
                raise _refuse(f"PCI: slot 0 function 0 not available for {device.driver}")
        addr = device.properties.get("addr")
        if isinstance(addr, str):
            slot = int(addr, 16)
            holder = (await self.root_bus_slots()).get(slot)
            if holder is not None:
                raise _refuse(f"PCI: slot {slot} function 0 not available for "
                              f"{device.driver}, in use by {holder or 'a device'}")
        self.devices[device.id] = device
        self.links[device.id] = True

    async def remove_device(self, device_id: str, timeout: float) -> None:
        if device_id not in self.devices:
            raise _refuse(f"Device '{device_id}' not found", "DeviceNotFound")
        released = self.released.setdefault(device_id, asyncio.Event())
        if self.auto_release:
            released.set()
        self.waiting.add(device_id)
        try:
            await asyncio.wait_for(released.wait(), timeout)
        except TimeoutError:
            raise OperationTimeout(
                f"the guest did not release device {device_id} within {timeout:g} s") from None
        finally:
            self.waiting.discard(device_id)
        self._deleted(device_id)

    def release(self, device_id: str) -> None:
        """The guest lets go of a device whose removal is pending; if nobody waits for
        it any more (the wait timed out), QEMU deletes it now all the same."""
        self.released.setdefault(device_id, asyncio.Event()).set()
        if device_id not in self.waiting and device_id in self.devices:
            self._deleted(device_id)

    def _deleted(self, device_id: str) -> None:
        del self.devices[device_id]
        self.released.pop(device_id, None)
        self.links.pop(device_id, None)
        if self.on_deleted is not None:
            self.on_deleted(device_id)

    async def add_netdev(self, netdev: NetdevSpec) -> None:
        if netdev.id in self.netdevs:
            raise _refuse(f"Duplicate ID '{netdev.id}' for netdev")
        fd = netdev.properties.get("fd")
        if isinstance(fd, str) and not fd.isdigit():
            if fd not in self.fds:
                raise _refuse(f"File descriptor named '{fd}' has not been found")
            self.netdev_fds[netdev.id] = self.fds.pop(fd)  # QEMU's monitor hands it over
        self.netdevs[netdev.id] = netdev
        self.links[netdev.id] = True

    async def remove_netdev(self, netdev_id: str) -> None:
        if self.netdevs.pop(netdev_id, None) is None:
            raise _refuse(f"Device '{netdev_id}' not found", "DeviceNotFound")
        self.links.pop(netdev_id, None)
        if netdev_id in self.netdev_fds:
            os.close(self.netdev_fds.pop(netdev_id))

    async def set_link(self, name: str, up: bool) -> None:
        if name not in self.devices and name not in self.netdevs:
            raise _refuse(f"Device '{name}' not found", "DeviceNotFound")
        self.links[name] = up

    async def device_ids(self) -> tuple[str, ...]:
        return (*sorted(self.buses or ()), *self.devices)

    async def devices_on(self, bus: str) -> tuple[str, ...]:
        if self.buses is not None and bus not in self.buses:
            raise _refuse(f"path '/machine/peripheral/{bus}/{bus}' does not exist",
                          "DeviceNotFound")
        return tuple(d.id for d in self.devices.values() if d.properties.get("bus") == bus)

    async def root_bus_slots(self) -> Mapping[int, str]:
        slots = dict(self.fixed_slots)
        for device in self.devices.values():
            addr = device.properties.get("addr")
            if isinstance(addr, str) and "bus" not in device.properties:
                slots[int(addr, 16)] = device.id
        return slots

    def close(self) -> None:
        for fd in [*self.fds.values(), *self.netdev_fds.values(),
                   *(f for s in self.fdsets.values() for f in s)]:
            os.close(fd)
        self.fds.clear()
        self.netdev_fds.clear()
        self.fdsets.clear()


@dataclass
class FakeMemory:
    """A guest's memory: the balloon (``size``: boot memory it has now) and virtio-mem
    devices (``requested`` by id, ``plugged``: what the guest took).
    ``driver`` False: a guest without the virtio-mem driver (nothing gets plugged);
    ``floor``: a guest that gives no memory back below it through the balloon."""

    size: int = 0  # what the guest has now
    target: int | None = None
    stats: BalloonStats = field(default_factory=lambda: BalloonStats(last_update=0))
    stats_interval: int = 0
    requested: dict[str, int] = field(default_factory=dict)
    plugged: dict[str, int] = field(default_factory=dict)
    maximum: dict[str, int] = field(default_factory=dict)
    driver: bool = True
    floor: int | None = None

    @classmethod
    def of_spec(cls, spec: MachineSpec) -> FakeMemory:
        fake = cls(size=spec.memory.size_bytes)
        if spec.memory.hotplug_bytes:
            fake.requested[MEMORY_DEVICE] = fake.plugged[MEMORY_DEVICE] = 0
            fake.maximum[MEMORY_DEVICE] = spec.memory.hotplug_bytes
        return fake

    async def set_balloon_target(self, size: int) -> None:
        if size <= 0:
            raise _refuse("Parameter 'value' expects a size")
        self.target = size
        self.size = max(size, self.floor or 0)  # a cooperative guest, at once

    async def balloon_size(self) -> int:
        return self.size

    async def set_stats_interval(self, seconds: int) -> None:
        self.stats_interval = seconds

    async def balloon_stats(self) -> BalloonStats:
        return self.stats

    async def set_memory_device_size(self, device_id: str, size: int) -> None:
        if device_id not in self.requested:
            raise _refuse(f"Device '{device_id}' not found", "DeviceNotFound")
        if size > self.maximum.get(device_id, size):
            raise _refuse("Property 'requested-size' is too big")
        self.requested[device_id] = size
        if self.driver:
            self.plugged[device_id] = size

    async def memory_devices(self) -> dict[str, MemoryDeviceSize]:
        return {d: MemoryDeviceSize(self.plugged.get(d, 0), requested,
                                    self.maximum.get(d, requested))
                for d, requested in self.requested.items()}


@dataclass
class FakeMigration:
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: MigrationParameters = field(default_factory=MigrationParameters)
    uri: str | None = None
    incoming_uri: str | None = None
    # What stats() returns, in turn; the last one repeats.
    script: list[MigrationStats] = field(default_factory=list)
    current: MigrationStats = field(default_factory=lambda: MigrationStats("none"))

    async def set_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        if self.current.status in ("setup", "active"):
            raise _refuse("There's a migration process in progress")
        self.capabilities.update(capabilities)

    async def set_parameters(self, parameters: MigrationParameters) -> None:
        given = {k: v for k, v in vars(parameters).items() if v is not None}
        self.parameters = MigrationParameters(**{**vars(self.parameters), **given})

    async def start(self, uri: str) -> None:
        self.uri = uri
        self.current = MigrationStats("active")

    async def incoming(self, uri: str) -> None:
        self.incoming_uri = uri

    async def stats(self) -> MigrationStats:
        if self.script:
            self.current = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return self.current

    async def cancel(self) -> None:
        if not self.current.finished:
            self.current = MigrationStats("cancelled")


@dataclass
class FakeBlockJobs:
    nodes: dict[str, BlockNodeSpec] = field(default_factory=dict)
    overlays: dict[str, str] = field(default_factory=dict)  # node -> overlay on top
    roots: set[str] = field(default_factory=set)  # the devices' nodes at launch
    running: dict[str, BlockJobInfo] = field(default_factory=dict)
    bitmaps: set[tuple[str, str]] = field(default_factory=set)
    nbd_socket: str | None = None
    exports: dict[str, NbdExport] = field(default_factory=dict)
    io: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> read, written

    @classmethod
    def of_spec(cls, spec: MachineSpec) -> FakeBlockJobs:
        """The nodes a machine is launched with (each disk's chain), as QEMU names them."""
        return cls(nodes={node.id: BlockNodeSpec(node.id, node.format, node.path,
                                                 None if node.backing is None
                                                 else node.backing.id, node.read_only)
                          for device in spec.block_devices for node in device.node.chain()},
                   roots={device.node.id for device in spec.block_devices},
                   io={device.id: (0, 0) for device in spec.block_devices})

    async def add_node(self, node: BlockNodeSpec) -> None:
        if node.node_name in self.nodes:
            raise _refuse(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node

    async def remove_node(self, node_name: str) -> None:
        if self.nodes.pop(node_name, None) is None:
            raise _refuse(f"Failed to find node with node-name='{node_name}'")

    async def snapshot(self, snapshots: Sequence[Snapshot],
                       bitmaps: Sequence[DirtyBitmap] = ()) -> None:
        for snap in snapshots:  # all or nothing, as a transaction
            if snap.overlay not in self.nodes:
                raise _refuse(f"Cannot find device='' nor node-name='{snap.overlay}'")
        for bitmap in bitmaps:
            if (bitmap.node, bitmap.name) in self.bitmaps:
                raise _refuse(f"Bitmap already exists: {bitmap.name}")
        self.overlays.update({snap.node: snap.overlay for snap in snapshots})
        self.bitmaps.update((b.node, b.name) for b in bitmaps)

    def _start(self, job_id: str, kind: str) -> None:
        if job_id in self.running:
            raise _refuse(f"Job ID '{job_id}' already in use")
        self.running[job_id] = BlockJobInfo(job_id, kind, "running", 0, 100)

    async def mirror(self, job_id: str, node: str, target: str, sync: str = "full",
                     write_blocking: bool = False, speed: int = 0) -> None:
        self._start(job_id, "mirror")
        self.running[job_id] = replace(self.running[job_id], speed=speed)

    async def backup(self, backups: Sequence[Backup]) -> None:
        for backup in backups:  # all or nothing, as a transaction
            if backup.job_id in self.running:
                raise _refuse(f"Job ID '{backup.job_id}' already in use")
        for backup in backups:
            self._start(backup.job_id, "backup")

    async def commit(self, job_id: str, node: str, top: str | None = None,
                     base: str | None = None, backing_file: str | None = None) -> None:
        self._start(job_id, "commit")

    async def writable(self, node: str) -> None:
        pass

    async def stream(self, job_id: str, node: str, base: str | None = None) -> None:
        self._start(job_id, "stream")

    async def jobs(self) -> list[BlockJobInfo]:
        return list(self.running.values())

    async def node_files(self) -> dict[str, str]:
        return {name: node.filename for name, node in self.nodes.items()}

    async def top_nodes(self) -> frozenset[str]:
        tops = set()
        for root in self.roots:
            while root in self.overlays:
                root = self.overlays[root]
            tops.add(root)
        return frozenset(tops)

    async def io_stats(self) -> tuple[BlockIoStats, ...]:
        return tuple(BlockIoStats(device, read, written)
                     for device, (read, written) in self.io.items())

    def _job(self, job_id: str) -> BlockJobInfo:
        if job_id not in self.running:
            raise _refuse(f"Block job '{job_id}' not found", "DeviceNotActive")
        return self.running[job_id]

    async def complete(self, job_id: str) -> None:
        self._job(job_id)
        del self.running[job_id]

    async def cancel(self, job_id: str, force: bool = False) -> None:
        self._job(job_id)
        del self.running[job_id]

    async def dismiss(self, job_id: str) -> None:
        self._job(job_id)
        del self.running[job_id]

    async def add_bitmap(self, bitmap: DirtyBitmap) -> None:
        await self.snapshot((), (bitmap,))

    async def remove_bitmap(self, node: str, name: str) -> None:
        if (node, name) not in self.bitmaps:
            raise _refuse(f"Dirty bitmap '{name}' not found")
        self.bitmaps.discard((node, name))

    async def start_nbd_server(self, socket_path: str) -> None:
        if self.nbd_socket is not None:
            raise _refuse("NBD server already running")
        self.nbd_socket = socket_path

    async def add_export(self, export: NbdExport) -> None:
        if self.nbd_socket is None:
            raise _refuse("NBD server not running")
        self.exports[export.name] = export

    async def remove_export(self, name: str) -> None:
        if self.exports.pop(name, None) is None:
            raise _refuse(f"Export '{name}' is not found")

    async def stop_nbd_server(self) -> None:
        self.nbd_socket = None
        self.exports.clear()


def _conforms(d: FakeDevices, m: FakeMemory, g: FakeMigration,
              b: FakeBlockJobs) -> tuple[Devices, Memory, Migration, BlockJobs]:
    """Never called: lets mypy check that the fakes implement the capability protocols."""
    return d, m, g, b
