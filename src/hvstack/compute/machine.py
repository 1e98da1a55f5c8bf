"""A VM's settings translated into the machine the hypervisor runs: the one place that
knows both a :class:`VmConfig` and a :class:`MachineSpec`.

:func:`machine_spec` is pure. It decides what each setting means for the machine:
generation 1 is an i440fx PC with SeaBIOS, IDE and emulated devices, generation 2 a
q35 PC with UEFI and its DVD drive on SCSI; the boot order becomes boot indices (the
first disk, the DVD drive, the first adapter); a Windows guest gets the Hyper-V
enlightenments, a local-time clock and a USB tablet. Disks and their backing chains
become block nodes named from the disk's id, adapters devices named from their MAC.

An adapter in switch mode is a tap port: the host opens the tap (always, also for an
adapter that is not connected: its tap is there, its link down) and hands the open
descriptor in ``tap_fds``; QEMU inherits it (``pass_fds``) and the netdev names it. A
user-mode adapter is QEMU's own NAT.

A VM with dynamic memory boots with its startup memory and gets a virtio balloon (with
free page reporting and statistics: it goes below startup) and a virtio-mem device
(above startup) whose region reaches the host's memory (rounded up to a GiB) above
startup, so the maximum can be raised while it runs; the region costs nothing until
blocks are plugged. A VM with static memory gets neither: its machine is unchanged.

A VM with processor compatibility runs :data:`COMPATIBLE_CPU_MODEL` instead of the
host's own processor, on KVM and TCG alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.model import (
    SWITCH_MODE,
    BootDevice,
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    VmConfig,
)
from hvstack.compute.model import NicModel as AdapterModel
from hvstack.errors import HypervisorError
from hvstack.hypervisor import spec as hw


@dataclass(frozen=True)
class BackingFile:
    """A parent in a disk's backing chain, with the format its child's header records
    (checked by :func:`hvstack.storage.chain.read_chain` before it gets here)."""

    path: str
    format: str


@dataclass(frozen=True)
class MachineHost:
    """What the host contributes to every machine it runs."""

    accelerator: str  # "kvm" or "tcg": the VM's own choice, else the host's
    uefi_code: str  # the UEFI firmware's code (read-only, shared)
    binary: str = "qemu-system-x86_64"
    memory_bytes: int = 0  # the host's memory: how far a dynamic VM's region reaches


# Processor compatibility's baseline: QEMU's Nehalem (x86-64-v2: SSE4.2, POPCNT,
# SSSE3, CX16), pinned to its version 1 so no machine type changes what it means. Every
# x86-64 server processor since Intel Nehalem (2008) and AMD Bulldozer (2011), and
# QEMU's TCG provide all of it, and today's distributions (RHEL 9: x86-64-v2) boot on
# it, which "qemu64" (no SSSE3/SSE4) does not promise. Not Nehalem-v2: its IBRS
# (spec-ctrl) is something TCG cannot give, and the model is started with "enforce".
COMPATIBLE_CPU_MODEL = "Nehalem-v1"

GIB = 1024**3
BLOCK = 2 * 1024 * 1024


def memory_spec(config: VmConfig, host_memory: int) -> hw.MemorySpec:
    """Static memory: boot memory only. Dynamic memory: boot with the startup memory,
    a balloon and a virtio-mem region covering the maximum and the host's memory."""
    if not config.dynamic_memory:
        return hw.MemorySpec(config.memory_bytes)
    maximum = config.memory_maximum_bytes or config.memory_bytes
    reach = max(-(-host_memory // GIB) * GIB, maximum - config.memory_bytes)
    return hw.MemorySpec(config.memory_bytes, balloon=True, free_page_reporting=True,
                         hotplug_bytes=max(BLOCK, -(-reach // BLOCK) * BLOCK))


_BUSES = {DiskBus.IDE: hw.BlockBus.IDE, DiskBus.SCSI: hw.BlockBus.SCSI,
          DiskBus.VIRTIO: hw.BlockBus.VIRTIO}
_MODELS = {AdapterModel.E1000: hw.NicModel.E1000, AdapterModel.VIRTIO: hw.NicModel.VIRTIO}


def _boot_index(config: VmConfig, device: BootDevice) -> int | None:
    if device in config.boot_order:
        return config.boot_order.index(device) + 1
    return None


def disk_node(disk: DiskAttachment, chain: tuple[BackingFile, ...] = ()) -> hw.BlockNode:
    """The block node of an attached disk, with its parents (nearest first) below it."""
    below: hw.BlockNode | None = None
    for parent in reversed(chain):
        below = hw.BlockNode(hw.backing_node_id(disk.id, parent.path), parent.path,
                             parent.format, True, below)
    return hw.BlockNode(hw.disk_node_id(disk.id), disk.path, disk.format, disk.read_only,
                        below)


def _block_devices(config: VmConfig,
                   chains: Mapping[str, tuple[BackingFile, ...]]) -> list[hw.BlockDevice]:
    devices = []
    for index, disk in enumerate(config.disks):
        boot = _boot_index(config, BootDevice.DISK) if index == 0 else None
        devices.append(hw.BlockDevice(hw.disk_device_id(disk.id), _BUSES[disk.bus],
                                      disk_node(disk, tuple(chains.get(disk.id, ()))),
                                      hw.MediaKind.DISK, boot))
    if config.dvd is not None:
        bus = hw.BlockBus.IDE if config.generation is Generation.GEN1 else hw.BlockBus.SCSI
        media = hw.BlockNode(hw.DVD_NODE, config.dvd, "raw", True)
        devices.append(hw.BlockDevice(hw.DVD_DEVICE, bus, media, hw.MediaKind.CDROM,
                                      _boot_index(config, BootDevice.DVD)))
    return devices


def netdev_of(nic: NetworkAdapter, tap_fds: Mapping[str, int]) -> hw.Netdev:
    """The host side of ``nic``: its open tap (by MAC in ``tap_fds``) in switch mode,
    QEMU's user-mode NAT otherwise. HypervisorError if a switch-mode adapter has no tap."""
    if nic.mode != SWITCH_MODE:
        return hw.UserNetdev()
    fd = tap_fds.get(nic.mac)
    if fd is None:
        raise HypervisorError(f"network adapter {nic.mac} is a switch port but no tap "
                              "device was opened for it", mac=nic.mac)
    return hw.TapNetdev(str(fd))


def _net_devices(config: VmConfig, tap_fds: Mapping[str, int]) -> list[hw.NetDevice]:
    return [hw.NetDevice(nic.mac, _MODELS[nic.model], netdev_of(nic, tap_fds),
                         _boot_index(config, BootDevice.NETWORK) if index == 0 else None)
            for index, nic in enumerate(config.network_adapters)]


def runtime_paths(files: VmFiles) -> hw.RuntimePaths:
    return hw.RuntimePaths(
        qmp_socket=str(files.qmp_socket),
        serial_socket=str(files.serial_socket),
        serial_log=str(files.console_log),
        qga_socket=str(files.qga_socket),
        pidfile=str(files.pidfile),
        vnc_socket=str(files.vnc_socket),
    )


def machine_spec(vm_id: str, config: VmConfig, files: VmFiles, host: MachineHost, *,
                 chains: Mapping[str, tuple[BackingFile, ...]] | None = None,
                 incoming: bool = False,
                 tap_fds: Mapping[str, int] | None = None,
                 layout: hw.PortLayout | None = None) -> hw.MachineSpec:
    """The machine that runs ``config``. ``chains``: each disk's checked parents by disk
    id, nearest first (a disk missing there is opened without a parent). ``tap_fds``:
    the open tap of each adapter in switch mode, by MAC (every one must have one:
    HypervisorError naming the adapter otherwise); they become ``pass_fds``. ``layout``:
    where the adapters of the running machine whose state this one receives sit (a
    restore or an incoming migration after adapters were hot added or removed)."""
    taps = {mac.strip().lower().replace("-", ":"): fd for mac, fd in (tap_fds or {}).items()}
    net_devices = tuple(_net_devices(config, taps))
    passed = sorted({int(d.backend.fd) for d in net_devices
                     if isinstance(d.backend, hw.TapNetdev)})
    gen1 = config.generation is Generation.GEN1
    windows = config.os_type == "windows"
    firmware: hw.Firmware = (hw.SeaBios() if gen1
                             else hw.Uefi(host.uefi_code, str(files.efi_vars)))
    return hw.MachineSpec(
        vm_id=vm_id,
        chipset=hw.Chipset.I440FX if gen1 else hw.Chipset.Q35,
        accelerator=host.accelerator,
        cpus=config.cpus,
        memory=memory_spec(config, host.memory_bytes),
        paths=runtime_paths(files),
        firmware=firmware,
        enlightenments=hw.Enlightenments(hyperv=windows, rtc_localtime=windows,
                                         usb_tablet=windows),
        block_devices=tuple(_block_devices(config, chains or {})),
        net_devices=net_devices,
        incoming=incoming,
        binary=host.binary,
        pass_fds=tuple(passed),
        layout=layout,
        cpu_model=COMPATIBLE_CPU_MODEL if config.processor_compatibility else None,
    )
