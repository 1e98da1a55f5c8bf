"""QEMU's implementations of the machine capabilities, one QMP command per request.

Each class wraps the machine's :class:`~hvstack.hypervisor.qemu.monitor.Monitor`; the
parsers (``parse_*``) are pure and turn QMP replies into the capability dataclasses.
:class:`EventWaiters` lets a request wait for the event that ends it (``device_del``
returns at once; the device is gone at ``DEVICE_DELETED``): the waiter is registered
before the command is sent, so the event cannot be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.capabilities import (
    Backup,
    BalloonStats,
    BlockIoStats,
    BlockJobInfo,
    BlockNodeSpec,
    DeviceSpec,
    DirtyBitmap,
    FdSetMember,
    MemoryDeviceSize,
    MigrationParameters,
    MigrationStats,
    NbdExport,
    NetdevSpec,
    Snapshot,
)
from hvstack.hypervisor.events import DeviceDeleted, QmpEvent
from hvstack.hypervisor.qemu.monitor import Monitor

PERIPHERALS = "/machine/peripheral"  # QOM's home of every device given an id
BALLOON_PATH = f"{PERIPHERALS}/balloon0"
_UNREPORTED = 2**64 - 1


class EventWaiters:
    """Futures resolved by the first event that matches each one's predicate."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[QmpEvent], bool], asyncio.Future[QmpEvent]]] = []

    def expect(self, matches: Callable[[QmpEvent], bool]) -> asyncio.Future[QmpEvent]:
        future: asyncio.Future[QmpEvent] = asyncio.get_running_loop().create_future()
        self._waiting.append((matches, future))
        return future

    def discard(self, future: asyncio.Future[QmpEvent]) -> None:
        self._waiting = [(m, f) for m, f in self._waiting if f is not future]

    def notify(self, event: QmpEvent) -> None:
        for matches, future in list(self._waiting):
            if not future.done() and matches(event):
                future.set_result(event)


def _int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- devices ------------------------------------------------------------------------------


class QemuDevices:
    def __init__(self, monitor: Monitor, waiters: EventWaiters) -> None:
        self._monitor = monitor
        self._waiters = waiters

    async def pass_fd(self, fd: int, name: str) -> None:
        await self._monitor.send_fd(fd, name)

    async def close_fd(self, name: str) -> None:
        await self._monitor.execute("closefd", {"fdname": name})

    async def add_fd(self, fd: int, fdset: int | None = None, opaque: str = "") -> FdSetMember:
        arguments: dict[str, Any] = {}
        if fdset is not None:
            arguments["fdset-id"] = fdset
        if opaque:
            arguments["opaque"] = opaque
        reply = await self._monitor.execute_with_fd(fd, "add-fd", arguments)
        return FdSetMember(fdset=int(reply["fdset-id"]), fd=int(reply["fd"]))

    async def remove_fdset(self, fdset: int) -> None:
        await self._monitor.execute("remove-fd", {"fdset-id": fdset})

    async def add_device(self, device: DeviceSpec) -> None:
        await self._monitor.execute(
            "device_add", {**device.properties, "driver": device.driver, "id": device.id})

    async def remove_device(self, device_id: str, timeout: float) -> None:
        def deleted(event: QmpEvent) -> bool:
            info = DeviceDeleted.of(event)
            return info is not None and info.device == device_id

        def refused(event: QmpEvent) -> bool:
            return (event.name == "DEVICE_UNPLUG_GUEST_ERROR"
                    and event.text("device") == device_id)

        done, failed = self._waiters.expect(deleted), self._waiters.expect(refused)
        try:
            await self._monitor.execute("device_del", {"id": device_id})
            finished, _ = await asyncio.wait((done, failed), timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters.discard(done)
            self._waiters.discard(failed)
        if done in finished:
            return
        if failed in finished:
            raise HypervisorError(f"the guest refused to release device {device_id}",
                                  device=device_id)
        raise OperationTimeout(
            f"the guest did not release device {device_id} within {timeout:g} s",
            device=device_id, timeout=timeout)

    async def add_netdev(self, netdev: NetdevSpec) -> None:
        await self._monitor.execute(
            "netdev_add", {**netdev.properties, "type": netdev.type, "id": netdev.id})

    async def remove_netdev(self, netdev_id: str) -> None:
        await self._monitor.execute("netdev_del", {"id": netdev_id})

    async def set_link(self, name: str, up: bool) -> None:
        await self._monitor.execute("set_link", {"name": name, "up": up})

    async def device_ids(self) -> tuple[str, ...]:
        reply = await self._monitor.execute("qom-list", {"path": PERIPHERALS})
        return tuple(str(p["name"]) for p in reply
                     if str(p.get("type", "")).startswith("child<"))

    async def devices_on(self, bus: str) -> tuple[str, ...]:
        # A port's bus is its QOM child of the same name, with a child[N] link to each
        # device on it: unlike query-pci, this does not wait for the guest to number
        # the bus.
        path = f"{PERIPHERALS}/{bus}/{bus}"
        links = parse_bus_children(await self._monitor.execute("qom-list", {"path": path}))
        ids = []
        for link in links:
            target = await self._monitor.execute("qom-get", {"path": path, "property": link})
            ids.append(str(target).rpartition("/")[2])
        return tuple(ids)


    async def root_bus_slots(self) -> Mapping[int, str]:
        # The root bus is numbered 0 from the start; only bridges wait for the guest.
        return parse_root_slots(await self._monitor.execute("query-pci"))


def parse_root_slots(reply: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """``query-pci``: the slots of bus 0 that hold a device, with its id (function 0's
    when a slot has several functions)."""
    slots: dict[int, str] = {}
    for bus in reply:
        if bus.get("bus") != 0:
            continue
        for device in bus.get("devices") or ():
            slot = _int(device, "slot")
            if slot is not None and (slot not in slots or device.get("function") == 0):
                slots[slot] = str(device.get("qdev_id") or "")
    return slots


def parse_bus_children(reply: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``child[N]`` link properties of a bus in a ``qom-list`` reply."""
    return [str(p["name"]) for p in reply
            if str(p.get("name", "")).startswith("child[")
            and str(p.get("type", "")).startswith("link<")]


# -- memory -------------------------------------------------------------------------------


def parse_balloon_stats(reply: Mapping[str, Any]) -> BalloonStats:
    """Parse ``qom-get guest-stats``.

    A figure the guest has not reported is -1 as an unsigned 64-bit number
    (18446744073709551615 on the wire; QEMU's documentation says -1).
    """
    stats = reply.get("stats") or {}

    def figure(key: str) -> int | None:
        value = _int(stats, key)
        return None if value is None or not 0 <= value < _UNREPORTED else value

    return BalloonStats(
        last_update=_int(reply, "last-update") or 0,
        total=figure("stat-total-memory"),
        free=figure("stat-free-memory"),
        available=figure("stat-available-memory"),
        disk_caches=figure("stat-disk-caches"),
        swap_in=figure("stat-swap-in"),
        swap_out=figure("stat-swap-out"),
        major_faults=figure("stat-major-faults"),
        minor_faults=figure("stat-minor-faults"),
    )


class QemuMemory:
    def __init__(self, monitor: Monitor, balloon_path: str = BALLOON_PATH) -> None:
        self._monitor = monitor
        self._balloon = balloon_path

    async def set_balloon_target(self, size: int) -> None:
        await self._monitor.execute("balloon", {"value": size})

    async def balloon_size(self) -> int:
        reply = await self._monitor.execute("query-balloon")
        return int(reply["actual"])

    async def set_stats_interval(self, seconds: int) -> None:
        await self._monitor.execute("qom-set", {
            "path": self._balloon, "property": "guest-stats-polling-interval",
            "value": seconds})

    async def balloon_stats(self) -> BalloonStats:
        reply = await self._monitor.execute(
            "qom-get", {"path": self._balloon, "property": "guest-stats"})
        return parse_balloon_stats(reply)

    async def set_memory_device_size(self, device_id: str, size: int) -> None:
        await self._monitor.execute("qom-set", {
            "path": f"/machine/peripheral/{device_id}", "property": "requested-size",
            "value": size})

    async def memory_devices(self) -> Mapping[str, MemoryDeviceSize]:
        reply = await self._monitor.execute("query-memory-devices")
        return parse_memory_devices(reply)


def parse_memory_devices(reply: Any) -> dict[str, MemoryDeviceSize]:
    """Parse ``query-memory-devices``: the virtio-mem devices (DIMMs have no request)."""
    devices: dict[str, MemoryDeviceSize] = {}
    for entry in reply or ():
        data = entry.get("data") or {}
        if entry.get("type") != "virtio-mem" or not data.get("id"):
            continue
        devices[str(data["id"])] = MemoryDeviceSize(
            plugged=_int(data, "size") or 0, requested=_int(data, "requested-size") or 0,
            maximum=_int(data, "max-size") or 0)
    return devices


# -- migration ----------------------------------------------------------------------------


def parse_migration_stats(reply: Mapping[str, Any]) -> MigrationStats:
    """Parse ``query-migrate`` (most fields appear only in some states)."""
    ram: Mapping[str, Any] = reply.get("ram") or {}
    mbps = ram.get("mbps")
    error = reply.get("error-desc")
    return MigrationStats(
        status=str(reply.get("status", "none")),
        total_time_ms=_int(reply, "total-time"),
        downtime_ms=_int(reply, "downtime"),
        expected_downtime_ms=_int(reply, "expected-downtime"),
        ram_transferred=_int(ram, "transferred") or 0,
        ram_remaining=_int(ram, "remaining") or 0,
        ram_total=_int(ram, "total") or 0,
        dirty_pages_rate=_int(ram, "dirty-pages-rate") or 0,
        mbps=float(mbps) if isinstance(mbps, int | float) else 0.0,
        error=str(error) if error is not None else None,
    )


class QemuMigration:
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    async def set_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        await self._monitor.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": state} for name, state in capabilities.items()]})

    async def set_parameters(self, parameters: MigrationParameters) -> None:
        values = {
            "downtime-limit": parameters.downtime_limit_ms,
            "max-bandwidth": parameters.max_bandwidth,
            "multifd-channels": parameters.multifd_channels,
        }
        chosen = {key: value for key, value in values.items() if value is not None}
        if chosen:
            await self._monitor.execute("migrate-set-parameters", chosen)

    async def start(self, uri: str) -> None:
        await self._monitor.execute("migrate", {"uri": uri})

    async def incoming(self, uri: str) -> None:
        await self._monitor.execute("migrate-incoming", {"uri": uri})

    async def stats(self) -> MigrationStats:
        return parse_migration_stats(await self._monitor.execute("query-migrate"))

    async def cancel(self) -> None:
        await self._monitor.execute("migrate_cancel")


# -- block jobs ---------------------------------------------------------------------------


def parse_block_jobs(reply: Sequence[Mapping[str, Any]]) -> list[BlockJobInfo]:
    """Parse ``query-block-jobs``."""
    return [
        BlockJobInfo(
            job_id=str(job["device"]),
            type=str(job.get("type", "")),
            status=str(job.get("status", "")),
            offset=_int(job, "offset") or 0,
            length=_int(job, "len") or 0,
            speed=_int(job, "speed") or 0,
            ready=bool(job.get("ready", False)),
            error=str(job["error"]) if "error" in job else None,
        )
        for job in reply
    ]


def parse_blockstats(reply: Sequence[Mapping[str, Any]]) -> tuple[BlockIoStats, ...]:
    """Parse ``query-blockstats``: one entry per device with a medium. A device made
    with ``-device`` over a ``-blockdev`` has no legacy name; its ``qdev`` is its id,
    or for a virtio device the QOM path of its backend
    (``/machine/peripheral/<id>/virtio-backend``)."""
    found = []
    for entry in reply:
        stats: Mapping[str, Any] = entry.get("stats") or {}
        qdev = str(entry.get("qdev") or entry.get("device") or entry.get("node-name") or "")
        if qdev.startswith(PERIPHERALS + "/"):
            qdev = qdev.removeprefix(PERIPHERALS + "/").partition("/")[0]
        found.append(BlockIoStats(qdev, _int(stats, "rd_bytes") or 0,
                                  _int(stats, "wr_bytes") or 0))
    return tuple(found)


def plain_filename(name: str) -> str:
    """The file of a format node: QEMU names a node whose backing was given explicitly
    ``json:{..., "file": {"driver": "file", "filename": PATH}}``; PATH is its file."""
    if name.startswith("json:"):
        with contextlib.suppress(ValueError):
            spec = json.loads(name[5:])
            inner = spec.get("file") if isinstance(spec, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("filename"), str):
                return str(inner["filename"])
    return name


class QemuBlockJobs:
    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    async def add_node(self, node: BlockNodeSpec) -> None:
        arguments: dict[str, Any] = {
            "driver": node.format, "node-name": node.node_name,
            "file": {"driver": "file", "filename": node.filename,
                     "read-only": node.read_only},
            "read-only": node.read_only,
        }
        # A format without backing files (raw) refuses the key; a qcow2 node gets it
        # always, null included, so QEMU never opens a parent its header names.
        if node.backing is not None or node.format == "qcow2":
            arguments["backing"] = node.backing
        await self._monitor.execute("blockdev-add", arguments)

    async def remove_node(self, node_name: str) -> None:
        await self._monitor.execute("blockdev-del", {"node-name": node_name})

    async def snapshot(self, snapshots: Sequence[Snapshot],
                       bitmaps: Sequence[DirtyBitmap] = ()) -> None:
        actions: list[dict[str, Any]] = [
            {"type": "blockdev-snapshot", "data": {"node": s.node, "overlay": s.overlay}}
            for s in snapshots
        ]
        actions += [{"type": "block-dirty-bitmap-add", "data": _bitmap(b)} for b in bitmaps]
        await self._monitor.execute("transaction", {"actions": actions})

    async def mirror(self, job_id: str, node: str, target: str, sync: str = "full",
                     write_blocking: bool = False, speed: int = 0) -> None:
        await self._monitor.execute("blockdev-mirror", {
            "job-id": job_id, "device": node, "target": target, "sync": sync,
            "auto-dismiss": False, "speed": speed,
            "copy-mode": "write-blocking" if write_blocking else "background"})

    async def backup(self, backups: Sequence[Backup]) -> None:
        await self._monitor.execute("transaction", {"actions": [
            {"type": "blockdev-backup",
             "data": {"job-id": b.job_id, "device": b.node, "target": b.target,
                      "sync": b.sync, "auto-dismiss": False}}
            for b in backups]})

    async def commit(self, job_id: str, node: str, top: str | None = None,
                     base: str | None = None, backing_file: str | None = None) -> None:
        arguments: dict[str, Any] = {"job-id": job_id, "device": node, "auto-dismiss": False}
        if top is not None:
            arguments["top-node"] = top
        if backing_file is not None:
            arguments["backing-file"] = backing_file
        if base is not None:
            arguments["base-node"] = base
        await self._monitor.execute("block-commit", arguments)

    async def writable(self, node: str) -> None:
        # A launch node's protocol node is its own "-blockdev" ("<node>-file", see
        # argv), opened read-only: a reopen of the format node alone cannot make it
        # writable. auto-read-only lets it take a writer when one comes.
        protocol = f"{node}-file"
        nodes = await self._monitor.execute("query-named-block-nodes", {"flat": True})
        found = next((n for n in nodes if n.get("node-name") == protocol), None)
        if found is None or not found.get("ro"):
            return
        await self._monitor.execute("blockdev-reopen", {"options": [{
            "driver": "file", "node-name": protocol, "filename": str(found["file"]),
            "read-only": False, "auto-read-only": True, "discard": "unmap"}]})

    async def stream(self, job_id: str, node: str, base: str | None = None) -> None:
        arguments: dict[str, Any] = {"job-id": job_id, "device": node, "auto-dismiss": False}
        if base is not None:
            arguments["base-node"] = base
        await self._monitor.execute("block-stream", arguments)

    async def jobs(self) -> list[BlockJobInfo]:
        return parse_block_jobs(await self._monitor.execute("query-block-jobs"))

    async def top_nodes(self) -> frozenset[str]:
        devices = await self._monitor.execute("query-block")
        return frozenset(str(d["inserted"]["node-name"]) for d in devices
                         if isinstance(d.get("inserted"), dict)
                         and d["inserted"].get("node-name"))

    async def io_stats(self) -> tuple[BlockIoStats, ...]:
        return parse_blockstats(await self._monitor.execute("query-blockstats"))

    async def node_files(self) -> dict[str, str]:
        nodes = await self._monitor.execute("query-named-block-nodes", {"flat": True})
        return {str(n["node-name"]): plain_filename(str(n["file"])) for n in nodes
                if n.get("node-name") and n.get("drv") not in ("file", "host_device")}

    async def complete(self, job_id: str) -> None:
        await self._monitor.execute("job-complete", {"id": job_id})

    async def cancel(self, job_id: str, force: bool = False) -> None:
        await self._monitor.execute("block-job-cancel", {"device": job_id, "force": force})

    async def dismiss(self, job_id: str) -> None:
        await self._monitor.execute("job-dismiss", {"id": job_id})

    async def add_bitmap(self, bitmap: DirtyBitmap) -> None:
        await self._monitor.execute("block-dirty-bitmap-add", _bitmap(bitmap))

    async def remove_bitmap(self, node: str, name: str) -> None:
        await self._monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    async def start_nbd_server(self, socket_path: str) -> None:
        await self._monitor.execute(
            "nbd-server-start", {"addr": {"type": "unix", "path": socket_path}})

    async def add_export(self, export: NbdExport) -> None:
        await self._monitor.execute("block-export-add", {
            "type": "nbd", "id": export.name, "node-name": export.node,
            "name": export.name, "writable": export.writable})

    async def remove_export(self, name: str) -> None:
        await self._monitor.execute("block-export-del", {"id": name})

    async def stop_nbd_server(self) -> None:
        await self._monitor.execute("nbd-server-stop")


def _bitmap(bitmap: DirtyBitmap) -> dict[str, Any]:
    return {"node": bitmap.node, "name": bitmap.name, "persistent": bitmap.persistent}
