"""The QEMU command line, built by one pure function from a VM spec.

:func:`build_argv` has no I/O: everything it needs (paths, firmware, accelerator) is in
:class:`QemuSpec`, so golden files pin its output. Block devices, devices and netdevs
use QEMU's JSON option syntax, where a user's string is a JSON string and cannot smuggle
in options; the few classic ``key=value`` options left have commas doubled by
:func:`escape_option`, QEMU's own escaping, and name every key explicitly (an implied
first key would let an ``=`` in a path split it).

Disks: every member of a disk's backing chain is its own pair of ``-blockdev`` nodes
(protocol and format), each format node naming the next with ``backing`` and the base
with ``"backing": null``, every format explicit: QEMU opens exactly the files listed
here and never a parent a qcow2 header names. Node names derive from the disk's id
(:func:`disk_node`, :func:`backing_node`).

Consoles: the serial port is a socket server (one client: the host service's console
hub) with a log file; the display is QEMU's VNC server on a unix socket in the run
directory, never a TCP port.

Windows guests (``os_type == "windows"``) get Hyper-V enlightenments under KVM (see
:data:`HYPERV_ENLIGHTENMENTS`), KVM's PIT catching up lost ticks by delaying them, no
HPET (Windows would prefer it to the synthetic timers), a slewing local-time RTC and a
USB tablet (an absolute pointer, so the mouse follows the VNC viewer's). Under TCG the
``hv-*`` flags are left out: QEMU 7.2 builds the Hyper-V CPUID leaves only for KVM, so a
TCG guest never sees them, and it refuses ``hv-vpindex`` (which ``hv-synic``,
``hv-stimer``, ``hv-tlbflush`` and ``hv-ipi`` depend on) outright.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from hvstack.compute.model import (
    BootDevice,
    DiskAttachment,
    DiskBus,
    Generation,
    NicModel,
    VmConfig,
    disk_id_of,
)

QGA_CHANNEL = "org.qemu.guest_agent.0"
_NODE_ID = re.compile(r"^[0-9A-Za-z]{1,10}$")

# Hyper-V enlightenments for Windows on KVM (QEMU docs/system/i386/hyperv.rst), in
# dependency order. All are migratable. Left out on purpose: hv-passthrough (the set
# would depend on the host's kernel, which breaks migration), hv-reenlightenment and
# hv-evmcs (nested Hyper-V only; the first needs a fixed TSC frequency to migrate, the
# second is Intel-only), hv-crash (with the default panic action it stops Windows from
# writing crash dumps), hv-syndbg and hv-enforce-cpuid (debugging features),
# hv-no-nonarch-coresharing (only true with pinned vCPUs) and hv-avic (needs APICv/AVIC).
HYPERV_ENLIGHTENMENTS = (
    "hv-relaxed=on",
    "hv-vapic=on",
    "hv-spinlocks=0x1fff",
    "hv-vpindex=on",
    "hv-runtime=on",
    "hv-time=on",
    "hv-synic=on",
    "hv-stimer=on",
    "hv-stimer-direct=on",
    "hv-frequencies=on",
    "hv-reset=on",
    "hv-tlbflush=on",
    "hv-ipi=on",
)


@dataclass(frozen=True)
class RuntimePaths:
    """Where a running VM's sockets and files live."""

    qmp_socket: str
    serial_socket: str
    serial_log: str
    qga_socket: str
    pidfile: str
    vnc_socket: str


@dataclass(frozen=True)
class Firmware:
    """UEFI firmware for Generation 2: read-only code and the VM's own variable store."""

    code: str
    vars: str


@dataclass(frozen=True)
class BackingFile:
    """A parent in a disk's backing chain, with the format its child's header records
    (checked by :func:`hvstack.storage.chain.read_chain` before it gets here)."""

    path: str
    format: str


@dataclass(frozen=True)
class QemuSpec:
    vm_id: str
    config: VmConfig
    accelerator: str  # "kvm" or "tcg"
    paths: RuntimePaths
    firmware: Firmware | None = None
    incoming: bool = False  # wait for saved state on a migration channel (-incoming defer)
    binary: str = "qemu-system-x86_64"
    backing: Mapping[str, tuple[BackingFile, ...]] = field(default_factory=dict)
    """Each attached disk's parents by disk id, nearest first; a disk missing here is
    opened without a parent."""
    # Descriptors QEMU inherits under the same numbers; options name them as fd=N or
    # through an fd set (-add-fd fd=N,set=S, then /dev/fdset/S).
    pass_fds: tuple[int, ...] = ()


def escape_option(value: str) -> str:
    """Escape a value for QEMU's classic ``key=value,...`` syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


def _socket_chardev(chardev_id: str, path: str, extra: str = "") -> list[str]:
    options = f"socket,id={chardev_id},path={escape_option(path)},server=on,wait=off{extra}"
    return ["-chardev", options]


_WITH_BACKING = ("qcow2",)
"""Formats whose node takes a ``backing`` option (raw, vhdx and vpc have none)."""
_UNSET = object()


def _block_nodes(node: str, path: str, fmt: str, read_only: bool,
                 backing: object = _UNSET) -> list[str]:
    """A protocol node and a format node; ``backing`` (a node name or None) is given to
    formats that can have one, so QEMU never opens a parent a header names."""
    file_node: dict[str, object] = {
        "driver": "file",
        "filename": path,
        "node-name": f"{node}-file",
        "read-only": read_only,
        "discard": "unmap",
    }
    fmt_node: dict[str, object] = {
        "driver": fmt,
        "file": f"{node}-file",
        "node-name": node,
        "read-only": read_only,
        "discard": "unmap",
    }
    if fmt in _WITH_BACKING and backing is not _UNSET:
        fmt_node["backing"] = backing
    return ["-blockdev", _json(file_node), "-blockdev", _json(fmt_node)]


def disk_node(disk: DiskAttachment) -> str:
    """The node name of an attached disk's format node, from its stable id (not from
    its position, so checkpoints and migration can address it)."""
    ident = disk.id if _NODE_ID.match(disk.id) else disk_id_of(disk.id)
    return f"disk-{ident}"


def backing_node(disk: DiskAttachment, parent: BackingFile) -> str:
    """The node name of a parent in ``disk``'s chain: the disk's node and the parent's
    path, so two disks sharing a parent get two nodes."""
    return f"{disk_node(disk)}-{hashlib.sha256(parent.path.encode()).hexdigest()[:8]}"


def _disk_nodes(disk: DiskAttachment, chain: tuple[BackingFile, ...]) -> list[str]:
    """The disk and every parent, the base with ``"backing": null`` (as libvirt does).
    The base comes first: QEMU resolves ``backing`` to a node defined before it."""
    names = [disk_node(disk), *(backing_node(disk, p) for p in chain)]
    members = [(disk.path, disk.format, disk.read_only), *((p.path, p.format, True)
                                                         for p in chain)]
    args: list[str] = []
    for index in reversed(range(len(members))):
        path, fmt, read_only = members[index]
        below = names[index + 1] if index + 1 < len(names) else None
        args += _block_nodes(names[index], path, fmt, read_only, below)
    return args


def _boot_index(config: VmConfig, device: BootDevice) -> int | None:
    if device in config.boot_order:
        return config.boot_order.index(device) + 1
    return None


def _windows_on_kvm(spec: QemuSpec) -> bool:
    return spec.config.os_type == "windows" and spec.accelerator == "kvm"


def _machine_args(spec: QemuSpec) -> list[str]:
    # Without an HPET, Windows on KVM takes the Hyper-V synthetic timers (hv-stimer).
    hpet = ",hpet=off" if _windows_on_kvm(spec) else ""
    if spec.config.generation is Generation.GEN1:
        return ["-machine", f"pc{hpet}", "-accel", spec.accelerator]
    machine = f"q35{hpet}"
    args: list[str] = []
    if spec.firmware is not None:
        args += _block_nodes("fw-code", spec.firmware.code, "raw", True)
        args += _block_nodes("fw-vars", spec.firmware.vars, "raw", False)
        machine += ",pflash0=fw-code,pflash1=fw-vars"
    return ["-machine", machine, "-accel", spec.accelerator, *args]


def block_node_paths(spec: QemuSpec) -> dict[str, str]:
    """Each block node name :func:`build_argv` gives ``spec``'s disks, and its file.

    QEMU names nodes in its events (``BLOCK_IO_ERROR``'s ``node-name``); this maps them
    back to the files the user knows. Protocol nodes (``<node>-file``) and the nodes of
    parents in a backing chain map too.
    """
    nodes: dict[str, str] = {}
    for disk in spec.config.disks:
        node = disk_node(disk)
        nodes[node] = nodes[f"{node}-file"] = disk.path
        for parent in spec.backing.get(disk.id, ()):
            below = backing_node(disk, parent)
            nodes[below] = nodes[f"{below}-file"] = parent.path
    if spec.config.dvd is not None:
        nodes["dvd0"] = nodes["dvd0-file"] = spec.config.dvd
    return nodes


def _storage_args(config: VmConfig, backing: Mapping[str, tuple[BackingFile, ...]]) -> list[str]:
    args: list[str] = []
    ide_slot = 0
    need_scsi = any(d.bus is DiskBus.SCSI for d in config.disks) or (
        config.dvd is not None and config.generation is Generation.GEN2
    )
    if need_scsi:
        args += ["-device", _json({"driver": "virtio-scsi-pci", "id": "scsi0"})]
    for index, disk in enumerate(config.disks):
        args += _disk_nodes(disk, tuple(backing.get(disk.id, ())))
        device: dict[str, object] = {"drive": disk_node(disk), "id": f"disk{index}-dev"}
        if disk.bus is DiskBus.IDE:
            device |= {"driver": "ide-hd", "bus": f"ide.{ide_slot // 2}", "unit": ide_slot % 2}
            ide_slot += 1
        elif disk.bus is DiskBus.SCSI:
            device |= {"driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 0,
                       "lun": index}
        else:
            device |= {"driver": "virtio-blk-pci"}
        boot = _boot_index(config, BootDevice.DISK)
        if index == 0 and boot is not None:
            device["bootindex"] = boot
        args += ["-device", _json(device)]
    if config.dvd is not None:
        args += _block_nodes("dvd0", config.dvd, "raw", True)
        cd: dict[str, object] = {"drive": "dvd0", "id": "dvd0-dev"}
        if config.generation is Generation.GEN1:
            cd |= {"driver": "ide-cd", "bus": f"ide.{ide_slot // 2}", "unit": ide_slot % 2}
        else:
            cd |= {"driver": "scsi-cd", "bus": "scsi0.0", "channel": 0, "scsi-id": 1, "lun": 0}
        boot = _boot_index(config, BootDevice.DVD)
        if boot is not None:
            cd["bootindex"] = boot
        args += ["-device", _json(cd)]
    return args


def _network_args(config: VmConfig) -> list[str]:
    args: list[str] = []
    for index, nic in enumerate(config.network_adapters):
        netdev = f"net{index}"
        args += ["-netdev", _json({"type": "user", "id": netdev})]
        driver = "e1000" if nic.model is NicModel.E1000 else "virtio-net-pci"
        device: dict[str, object] = {"driver": driver, "netdev": netdev, "mac": nic.mac,
                                     "id": f"nic{index}"}
        boot = _boot_index(config, BootDevice.NETWORK)
        if index == 0 and boot is not None:
            device["bootindex"] = boot
        args += ["-device", _json(device)]
    return args


def _cpu_model(spec: QemuSpec) -> str:
    if spec.accelerator != "kvm":
        return "max"
    if spec.config.os_type == "windows":
        return ",".join(("host", *HYPERV_ENLIGHTENMENTS))
    return "host"


def _windows_args(spec: QemuSpec) -> list[str]:
    if spec.config.os_type != "windows":
        return []
    args = [
        "-device", _json({"driver": "qemu-xhci", "id": "usb0"}),
        "-device", _json({"driver": "usb-tablet", "id": "tablet0", "bus": "usb0.0"}),
    ]
    if _windows_on_kvm(spec):
        args += ["-global", "kvm-pit.lost_tick_policy=delay"]
    return args


def build_argv(spec: QemuSpec) -> list[str]:
    """Return the full argv that starts ``spec`` as a daemonized QEMU process."""
    config = spec.config
    paths = spec.paths
    windows = config.os_type == "windows"
    argv = [
        spec.binary,
        "-name", f"guest={escape_option(spec.vm_id)},debug-threads=on",
        "-uuid", spec.vm_id,
        "-nodefaults",
        "-no-user-config",
        *_machine_args(spec),
        "-cpu", _cpu_model(spec),
        "-smp", str(config.cpus),
        "-m", f"size={config.memory_bytes // (1024 * 1024)}M",
        "-rtc", "base=localtime,driftfix=slew" if windows else "base=utc",
        "-display", "none",
        "-vnc", f"vnc=unix:{escape_option(paths.vnc_socket)}",
        "-device", _json({"driver": "VGA", "id": "video0"}),
        *_windows_args(spec),
        *_socket_chardev("qmp", paths.qmp_socket),
        "-mon", "chardev=qmp,mode=control",
        *_socket_chardev(
            "serial0", paths.serial_socket,
            f",logfile={escape_option(paths.serial_log)},logappend=on",
        ),
        "-serial", "chardev:serial0",
        "-device", _json({"driver": "virtio-serial-pci", "id": "vserial0"}),
        *_socket_chardev("qga0", paths.qga_socket),
        "-device", _json({"driver": "virtserialport", "chardev": "qga0",
                          "name": QGA_CHANNEL, "id": "qga0-port"}),
        "-device", _json({"driver": "virtio-rng-pci", "id": "rng0"}),
        *_storage_args(config, spec.backing),
        *_network_args(config),
        # spawn and elevateprivileges stay allowed: -daemonize forks and calls setsid.
        "-sandbox", "on,obsolete=deny,resourcecontrol=deny",
        "-pidfile", paths.pidfile,
        "-daemonize",
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv
