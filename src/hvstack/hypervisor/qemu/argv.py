"""The QEMU command line, built by one pure function from a machine description.

:func:`build_argv` has no I/O: everything it needs (paths, firmware, accelerator,
devices) is in :class:`~hvstack.hypervisor.spec.MachineSpec`, so golden files pin its
output. Block devices, devices and netdevs use QEMU's JSON option syntax, where a user's
string is a JSON string and cannot smuggle in options; the few classic ``key=value``
options left have commas doubled by :func:`escape_option`, QEMU's own escaping, and name
every key explicitly (an implied first key would let an ``=`` in a path split it).

Disks: every member of a disk's backing chain is its own pair of ``-blockdev`` nodes
(protocol ``<node>-file`` and format ``<node>``), each format node naming the next with
``backing`` and the base with ``"backing": null``, every format explicit: QEMU opens
exactly the files listed here and never a parent a qcow2 header names. Node, device and
netdev ids are the spec's own (from identities, never positions).

Network adapters: on a q35 machine each sits on its own ``pcie-root-port`` (see
:meth:`~hvstack.hypervisor.spec.MachineSpec.root_ports`), and spare root ports wait for
hot-plugged devices; on an i440fx machine each has a fixed slot (``addr``) of the root
bus (:data:`~hvstack.hypervisor.spec.NIC_SLOTS`), and hot-plugged ones take free slots
there. Their options come before the disks' there, so that QEMU, which places the disks
on the first free slots, never puts one on an adapter's slot. A tap netdev names the
descriptor the host opened (``fd``), nothing else. A spec with ``legacy_nic_layout``
gets exactly the previous release's options (adapters after the disks, placed by QEMU,
no root ports), so a state that release saved can be restored
(``tests/golden/legacy`` pins them).

Consoles: the serial port is a socket server (one client: the host service's console
hub) with a log file; the display is QEMU's VNC server on a unix socket in the run
directory, never a TCP port.

Enlightenments (asked for Windows guests): ``hyperv`` gives Hyper-V enlightenments
under KVM (see :data:`HYPERV_ENLIGHTENMENTS`), KVM's PIT catching up lost ticks by
delaying them and no HPET (Windows would prefer it to the synthetic timers);
``rtc_localtime`` a slewing local-time RTC; ``usb_tablet`` an absolute pointer, so the
mouse follows the VNC viewer's. Under TCG the ``hv-*`` flags are left out: QEMU 7.2
builds the Hyper-V CPUID leaves only for KVM, so a TCG guest never sees them, and it
refuses ``hv-vpindex`` (which ``hv-synic``, ``hv-stimer``, ``hv-tlbflush`` and
``hv-ipi`` depend on) outright.

Processor: the host's own (``host`` under KVM, ``max`` under TCG), unless the spec names
a baseline model (``cpu_model``: processor compatibility), which QEMU must then provide
whole (``enforce``).
"""

from __future__ import annotations

import json

from hvstack.hypervisor.spec import (
    BALLOON_DEVICE,
    MEMORY_BACKEND,
    MEMORY_DEVICE,
    MEMORY_DEVICE_SLOT,
    BlockBus,
    BlockDevice,
    BlockNode,
    Chipset,
    MachineSpec,
    MediaKind,
    NetDevice,
    NicModel,
    TapNetdev,
    Uefi,
    slot_address,
)

QGA_CHANNEL = "org.qemu.guest_agent.0"

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


def _block_nodes(node: str, path: str, fmt: str, read_only: bool,
                 backing: str | None = None) -> list[str]:
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
    if fmt in _WITH_BACKING:
        fmt_node["backing"] = backing
    return ["-blockdev", _json(file_node), "-blockdev", _json(fmt_node)]


def _chain_nodes(top: BlockNode) -> list[str]:
    """Every node of a chain, the base first (QEMU resolves ``backing`` to a node
    defined before it), the base with ``"backing": null`` (as libvirt does)."""
    args: list[str] = []
    for node in reversed(top.chain()):
        below = node.backing.id if node.backing is not None else None
        args += _block_nodes(node.id, node.path, node.format, node.read_only, below)
    return args


def _windows_on_kvm(spec: MachineSpec) -> bool:
    return spec.enlightenments.hyperv and spec.accelerator == "kvm"


def _machine_args(spec: MachineSpec) -> list[str]:
    # Without an HPET, Windows on KVM takes the Hyper-V synthetic timers (hv-stimer).
    hpet = ",hpet=off" if _windows_on_kvm(spec) else ""
    machine = ("pc" if spec.chipset is Chipset.I440FX else "q35") + hpet
    args: list[str] = []
    if isinstance(spec.firmware, Uefi):
        args += _block_nodes("fw-code", spec.firmware.code, "raw", True)
        args += _block_nodes("fw-vars", spec.firmware.vars, "raw", False)
        machine += ",pflash0=fw-code,pflash1=fw-vars"
    return ["-machine", machine, "-accel", spec.accelerator, *args]


def block_node_paths(spec: MachineSpec) -> dict[str, str]:
    """Each block node name :func:`build_argv` gives ``spec``'s devices, and its file.

    QEMU names nodes in its events (``BLOCK_IO_ERROR``'s ``node-name``); this maps them
    back to the files the user knows. Protocol nodes (``<node>-file``) and the nodes of
    parents in a backing chain map too.
    """
    nodes: dict[str, str] = {}
    for node in spec.block_nodes():
        nodes[node.id] = nodes[f"{node.id}-file"] = node.path
    return nodes


def _block_device(device: BlockDevice, ide_slot: int, lun: int) -> dict[str, object]:
    """The ``-device`` of a disk or DVD drive; IDE units and SCSI LUNs in spec order (a
    disk's LUN is its place among the disks, a DVD drive is SCSI target 1)."""
    cdrom = device.kind is MediaKind.CDROM
    options: dict[str, object] = {"drive": device.node.id, "id": device.id}
    if device.bus is BlockBus.IDE:
        options |= {"driver": "ide-cd" if cdrom else "ide-hd", "bus": f"ide.{ide_slot // 2}",
                    "unit": ide_slot % 2}
    elif device.bus is BlockBus.SCSI:
        options |= {"driver": "scsi-cd" if cdrom else "scsi-hd", "bus": "scsi0.0",
                    "channel": 0, "scsi-id": 1 if cdrom else 0, "lun": 0 if cdrom else lun}
    else:
        options |= {"driver": "virtio-blk-pci"}
    if device.boot_index is not None:
        options["bootindex"] = device.boot_index
    return options


def _storage_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    if any(d.bus is BlockBus.SCSI for d in spec.block_devices):
        args += ["-device", _json({"driver": "virtio-scsi-pci", "id": "scsi0"})]
    ide_slot = 0
    disks = 0
    for device in spec.block_devices:
        args += _chain_nodes(device.node)
        args += ["-device", _json(_block_device(device, ide_slot, disks))]
        ide_slot += device.bus is BlockBus.IDE
        disks += device.kind is MediaKind.DISK
    return args


def _netdev(nic: NetDevice) -> dict[str, object]:
    # No vnet_hdr with fd: QEMU 7.2 refuses the option there and asks the tap itself
    # (TUNGETIFF), so a tap opened with IFF_VNET_HDR gets offloads without it.
    if isinstance(nic.backend, TapNetdev):
        return {"type": "tap", "id": nic.netdev_id, "fd": nic.backend.fd}
    return {"type": "user", "id": nic.netdev_id}


def _root_port_args(spec: MachineSpec) -> list[str]:
    # io-reserve 0: the firmware gives a port no I/O window (a q35 machine has room for
    # only about ten); what sits on them, virtio on PCIe, is modern-only and needs none.
    args: list[str] = []
    for port in spec.root_ports():
        args += ["-device", _json({"driver": "pcie-root-port", "id": port.id,
                                   "chassis": port.chassis, "slot": port.slot,
                                   "io-reserve": 0})]
    return args


def _network_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    for nic in spec.net_devices:
        args += ["-netdev", _json(_netdev(nic))]
        driver = "e1000" if nic.model is NicModel.E1000 else "virtio-net-pci"
        device: dict[str, object] = {"driver": driver, "netdev": nic.netdev_id, "mac": nic.mac,
                                     "id": nic.id}
        bus = spec.nic_bus(nic)
        if bus is not None:  # its own root port, so the guest can let go of it (hot remove)
            device["bus"] = bus
        slot = spec.nic_slot(nic)
        if slot is not None:  # the same slot on every start and restore
            device["addr"] = slot_address(slot)
        if nic.boot_index is not None:
            device["bootindex"] = nic.boot_index
        args += ["-device", _json(device)]
    return args


def _disk_and_network_args(spec: MachineSpec) -> list[str]:
    if spec.legacy_nic_layout:  # root_ports() is empty, nic_bus and nic_slot None
        return [*_storage_args(spec), *_network_args(spec)]
    if spec.chipset is Chipset.I440FX:  # the adapters' slots are taken before the disks'
        return [*_network_args(spec), *_storage_args(spec)]
    return [*_storage_args(spec), *_root_port_args(spec), *_network_args(spec)]


def _cpu_model(spec: MachineSpec) -> str:
    if spec.cpu_model is not None:
        # enforce: a host that lacks a feature of the baseline refuses to start the VM
        # rather than quietly dropping it, so the guest sees the same CPU on every host.
        model: tuple[str, ...] = (spec.cpu_model, "enforce")
    else:
        model = ("host",) if spec.accelerator == "kvm" else ("max",)
    if _windows_on_kvm(spec):
        return ",".join((*model, *HYPERV_ENLIGHTENMENTS))
    return ",".join(model)


def _pointer_and_timer_args(spec: MachineSpec) -> list[str]:
    args: list[str] = []
    if spec.enlightenments.usb_tablet:
        args += [
            "-device", _json({"driver": "qemu-xhci", "id": "usb0"}),
            "-device", _json({"driver": "usb-tablet", "id": "tablet0", "bus": "usb0.0"}),
        ]
    if _windows_on_kvm(spec):
        args += ["-global", "kvm-pit.lost_tick_policy=delay"]
    return args


MIB = 1024 * 1024


def _memory_size(spec: MachineSpec) -> str:
    memory = spec.memory
    if not memory.hotplug_bytes:
        return f"size={memory.size_bytes // MIB}M"
    return f"size={memory.size_bytes // MIB}M,slots=1,maxmem={memory.max_bytes // MIB}M"


def _memory_devices(spec: MachineSpec) -> list[str]:
    memory, args = spec.memory, []
    if memory.balloon:
        balloon: dict[str, object] = {"driver": "virtio-balloon-pci", "id": BALLOON_DEVICE}
        if memory.free_page_reporting:
            balloon["free-page-reporting"] = True
        args += ["-device", _json(balloon)]
    if memory.hotplug_bytes:
        # reserve=off: the region costs nothing until blocks are plugged into it.
        args += ["-object", _json({"qom-type": "memory-backend-ram", "id": MEMORY_BACKEND,
                                   "size": memory.hotplug_bytes, "reserve": False})]
        device: dict[str, object] = {"driver": "virtio-mem-pci", "id": MEMORY_DEVICE,
                                     "memdev": MEMORY_BACKEND, "block-size": 2 * MIB,
                                     "requested-size": 0}
        if spec.chipset is Chipset.I440FX:
            device["addr"] = slot_address(MEMORY_DEVICE_SLOT)
        args += ["-device", _json(device)]
    return args


def build_argv(spec: MachineSpec) -> list[str]:
    """Return the full argv that starts ``spec`` as a daemonized QEMU process."""
    paths = spec.paths
    argv = [
        spec.binary,
        "-name", f"guest={escape_option(spec.vm_id)},debug-threads=on",
        "-uuid", spec.vm_id,
        "-nodefaults",
        "-no-user-config",
        *_machine_args(spec),
        "-cpu", _cpu_model(spec),
        "-smp", str(spec.cpus),
        "-m", _memory_size(spec),
        "-rtc",
        "base=localtime,driftfix=slew" if spec.enlightenments.rtc_localtime else "base=utc",
        "-display", "none",
        "-vnc", f"vnc=unix:{escape_option(paths.vnc_socket)}",
        "-device", _json({"driver": "VGA", "id": "video0"}),
        *_pointer_and_timer_args(spec),
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
        *_memory_devices(spec),
        *_disk_and_network_args(spec),
        # spawn and elevateprivileges stay allowed: -daemonize forks and calls setsid.
        "-sandbox", "on,obsolete=deny,resourcecontrol=deny",
        "-pidfile", paths.pidfile,
        "-daemonize",
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv
