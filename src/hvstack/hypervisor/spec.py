"""The machine description: everything the hypervisor layer is asked to run, in its own
terms.

A :class:`MachineSpec` names the chipset, firmware, processors, memory, block nodes,
devices and netdevs of one machine. It knows nothing of a VM's settings (generation,
boot order, OS type): :func:`hvstack.compute.machine.machine_spec` is the one function
that translates those into it, and :func:`hvstack.hypervisor.qemu.argv.build_argv` the
one that turns it into a QEMU command line.

Every block node, device and netdev has an id derived from what it is, never from its
position: a disk's nodes and device from the disk's id (:func:`disk_node_id`,
:func:`disk_device_id`), an adapter's device and netdev from its MAC
(:func:`nic_device_id`) and, on a q35 machine, its PCIe root port too
(:func:`nic_port_id`; on an i440fx machine its slot on the root bus:
:meth:`MachineSpec.nic_slot`), the one DVD drive from :data:`DVD_DEVICE`. Hot plug, block jobs,
checkpoints and migration address them by these ids, and both ends of a migration build
the same ones. A spec whose ids collide is refused (:class:`InvalidInput`) before QEMU
sees it.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hvstack.errors import InvalidInput

_SIMPLE_ID = re.compile(r"^[0-9A-Za-z]{1,10}$")
_QEMU_ID = re.compile(r"^[A-Za-z][0-9A-Za-z._-]{0,30}$")
"""QEMU's rule for ids and node names (a letter, then letters, digits, '-', '.', '_'),
with its limit of 31 characters for node names."""

DVD_NODE = "dvd"
DVD_DEVICE = "dvd-dev"
BALLOON_DEVICE = "balloon0"
MEMORY_BACKEND = "dynmem-ram"  # the RAM behind the virtio-mem device (dynamic memory)
MEMORY_DEVICE = "dynmem0"  # the virtio-mem device that plugs memory above startup


def _ident(identity: str) -> str:
    """``identity`` if it is short and plain, else a digest of it (ten hex digits)."""
    if _SIMPLE_ID.match(identity):
        return identity
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


def disk_node_id(disk_id: str) -> str:
    """The format node of the disk with id ``disk_id``."""
    return f"disk-{_ident(disk_id)}"


def backing_node_id(disk_id: str, parent_path: str) -> str:
    """A file in a disk's chain other than the one the machine was launched with (a
    parent at launch, or an overlay or mirror target added at run time): named from the
    disk and the file's path, so two disks sharing a parent get a node each."""
    digest = hashlib.sha256(parent_path.encode()).hexdigest()[:8]
    return f"{disk_node_id(disk_id)}-{digest}"


def disk_device_id(disk_id: str) -> str:
    """The guest-visible device of the disk with id ``disk_id``."""
    return f"{disk_node_id(disk_id)}-dev"


def _mac_digits(mac: str) -> str:
    return mac.replace(":", "").lower()


def nic_device_id(mac: str) -> str:
    """The network adapter with MAC ``mac`` (``52:54:00:aa:bb:cc`` → ``nic-525400aabbcc``)."""
    return f"nic-{_mac_digits(mac)}"


def nic_netdev_id(mac: str) -> str:
    """The host side (netdev) of the network adapter with MAC ``mac``."""
    return f"net-{_mac_digits(mac)}"


def nic_port_id(mac: str) -> str:
    """The PCIe root port a q35 machine gives the adapter with MAC ``mac``."""
    return f"port-{_mac_digits(mac)}"


HOTPLUG_PORTS = 4
"""Spare PCIe root ports a q35 machine starts with, for devices added while it runs
(PCIe has no hot plug on the root complex itself)."""


def hotplug_port_id(index: int) -> str:
    return f"hotplug-port-{index}"


@dataclass(frozen=True)
class RootPort:
    """A ``pcie-root-port``: its (chassis, slot) pair must be unique in the machine."""

    id: str
    chassis: int
    slot: int


NIC_CHASSIS = 1  # the adapters' own ports: slot 1.. in the order of their MACs
HOTPLUG_CHASSIS = 2  # the spare ports: slot 1..N

NIC_SLOTS = range(0x10, 0x20)
"""i440fx: the slots of the root bus (pci.0) kept for network adapters, the ones a
machine starts with first, in the order of their MACs, then the hot-added ones on the
first free one. Slot 0 is the host bridge, 1 the PIIX (ISA, IDE, ACPI); QEMU places
every other device itself from slot 2 upward (display, virtio-serial, rng, balloon,
USB, SCSI controller: at most slot 7), then virtio disks, which come after the adapters
on the command line so that, however many there are, they skip the adapters' slots."""


MEMORY_DEVICE_SLOT = 0x0F
"""i440fx: the root-bus slot of the virtio-mem device (dynamic memory), fixed so the
machine looks the same on every start and restore, below :data:`NIC_SLOTS` and above
what QEMU gives the other built-in devices."""


def slot_address(slot: int) -> str:
    """A root-bus slot as QEMU's ``addr`` property spells it (``0x10``)."""
    return f"{slot:#04x}"


@dataclass(frozen=True)
class PortLayout:
    """Where the adapters of a running q35 machine sit, so that a machine restored from
    its saved state (or receiving it in a migration) is built the same: QEMU's state
    must land on the same devices at the same PCI addresses.

    ``own``: the MACs whose own ports the machine was started with (the port stays
    after its adapter is removed); ``hotplugged``: (MAC, spare port) of each adapter
    added since. On an i440fx machine, ``slots``: (MAC, root-bus slot) of each adapter
    (see :data:`NIC_SLOTS`). A cold start needs none: the adapters' MACs are the layout.
    """

    own: tuple[str, ...] = ()
    hotplugged: tuple[tuple[str, str], ...] = ()
    slots: tuple[tuple[str, int], ...] = ()  # in the order of the slots

    @staticmethod
    def at_launch(macs: Iterable[str]) -> PortLayout:
        return PortLayout(tuple(sorted(m.lower() for m in macs)))

    @staticmethod
    def slotted(macs: Iterable[str]) -> PortLayout:
        """i440fx: the adapters with MACs ``macs`` as a machine starts with them, on
        :data:`NIC_SLOTS` in the order of their MACs (those past the last slot get none)."""
        ordered = sorted(m.lower() for m in macs)
        return PortLayout(slots=tuple(zip(ordered, NIC_SLOTS, strict=False)))

    def at_slot(self, mac: str, slot: int) -> PortLayout:
        """i440fx: this layout after the adapter ``mac`` was hot added on ``slot``."""
        kept = tuple(s for s in self.slots if s[0] != mac.lower())
        return replace(self, slots=tuple(sorted((*kept, (mac.lower(), slot)),
                                                key=lambda s: s[1])))

    def slot_of(self, mac: str) -> int | None:
        return dict(self.slots).get(mac.lower())

    def plugged(self, mac: str, port: str) -> PortLayout:
        """This layout after the adapter ``mac`` was hot added on ``port``."""
        return replace(self, hotplugged=(*self.unplugged(mac).hotplugged, (mac.lower(), port)))

    def unplugged(self, mac: str) -> PortLayout:
        """This layout after the adapter ``mac`` was hot removed (a q35 machine keeps
        the adapter's own port; an i440fx machine's slot is free again)."""
        return replace(self, hotplugged=tuple(p for p in self.hotplugged
                                              if p[0] != mac.lower()),
                       slots=tuple(s for s in self.slots if s[0] != mac.lower()))

    def port_of(self, mac: str) -> str:
        return dict(self.hotplugged).get(mac.lower(), nic_port_id(mac))

    def to_json(self) -> dict[str, Any]:
        return {"own": list(self.own), "hotplugged": [list(p) for p in self.hotplugged],
                "slots": [list(s) for s in self.slots]}

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> PortLayout:
        return PortLayout(tuple(str(m) for m in raw.get("own", ())),
                          tuple((str(m), str(p)) for m, p in raw.get("hotplugged", ())),
                          tuple((str(m), int(s)) for m, s in raw.get("slots", ())))


class Chipset(enum.StrEnum):
    I440FX = "i440fx"  # with PIIX: IDE controllers, no PCIe
    Q35 = "q35"  # with ICH9: PCIe, AHCI


@dataclass(frozen=True)
class SeaBios:
    """The BIOS QEMU loads when no firmware is given."""


@dataclass(frozen=True)
class Uefi:
    """UEFI firmware: read-only code and the machine's own variable store."""

    code: str
    vars: str


Firmware = SeaBios | Uefi


@dataclass(frozen=True)
class Enlightenments:
    """What a guest OS is given beyond plain PC hardware.

    ``hyperv``: Hyper-V's paravirtual interfaces and timers (a hypervisor that cannot
    offer them, such as QEMU's TCG, leaves them out); ``rtc_localtime``: the clock keeps
    local time and slews after a pause; ``usb_tablet``: an absolute pointer.
    """

    hyperv: bool = False
    rtc_localtime: bool = False
    usb_tablet: bool = False


@dataclass(frozen=True)
class BlockNode:
    """A file opened with an explicit format; ``backing`` is its parent node, and None
    means it has none (the hypervisor opens no parent a header names)."""

    id: str
    path: str
    format: str
    read_only: bool = False
    backing: BlockNode | None = None

    def chain(self) -> tuple[BlockNode, ...]:
        """This node and its parents, nearest first."""
        nodes: list[BlockNode] = []
        node: BlockNode | None = self
        while node is not None:
            nodes.append(node)
            node = node.backing
        return tuple(nodes)


class BlockBus(enum.StrEnum):
    IDE = "ide"
    SCSI = "scsi"
    VIRTIO = "virtio"


class MediaKind(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


@dataclass(frozen=True)
class BlockDevice:
    """A disk or DVD drive the guest sees, on ``bus``, reading ``node``. Addresses on a
    bus (IDE unit, SCSI LUN) follow the order of the spec's block devices."""

    id: str
    bus: BlockBus
    node: BlockNode
    kind: MediaKind = MediaKind.DISK
    boot_index: int | None = None


class NicModel(enum.StrEnum):
    E1000 = "e1000"  # emulated Intel adapter
    VIRTIO = "virtio"  # synthetic


@dataclass(frozen=True)
class UserNetdev:
    """User-mode NAT inside the hypervisor's process."""


@dataclass(frozen=True)
class TapNetdev:
    """A tap device opened by the host: ``fd`` is a descriptor number passed at launch
    (see ``MachineSpec.pass_fds``) or the name a descriptor was given with ``getfd``."""

    fd: str


Netdev = UserNetdev | TapNetdev


@dataclass(frozen=True)
class NetDevice:
    """A network adapter and its host side (netdev), both named from its MAC."""

    mac: str
    model: NicModel
    backend: Netdev = UserNetdev()
    boot_index: int | None = None

    @property
    def id(self) -> str:
        return nic_device_id(self.mac)

    @property
    def netdev_id(self) -> str:
        return nic_netdev_id(self.mac)


@dataclass(frozen=True)
class MemorySpec:
    """Boot memory (``size_bytes``: a dynamic memory VM's startup memory); ``balloon``
    adds a virtio balloon (device :data:`BALLOON_DEVICE`; ``free_page_reporting``: the
    guest hands its free pages back to the host). ``hotplug_bytes`` > 0 adds a
    virtio-mem device (:data:`MEMORY_DEVICE`) over a RAM backend of that size
    (:data:`MEMORY_BACKEND`, reserved only as blocks are plugged); it starts with
    nothing plugged."""

    size_bytes: int
    balloon: bool = False
    hotplug_bytes: int = 0
    free_page_reporting: bool = False

    def __post_init__(self) -> None:
        if self.hotplug_bytes < 0 or self.hotplug_bytes % (2 * 1024 * 1024):
            raise InvalidInput("the hot-pluggable memory must be whole 2 MiB blocks",
                               value=self.hotplug_bytes)

    @property
    def max_bytes(self) -> int:
        """The most memory the machine can hold: boot memory and every block plugged."""
        return self.size_bytes + self.hotplug_bytes


@dataclass(frozen=True)
class RuntimePaths:
    """Where a running machine's sockets and files live."""

    qmp_socket: str
    serial_socket: str
    serial_log: str
    qga_socket: str
    pidfile: str
    vnc_socket: str


@dataclass(frozen=True)
class MachineSpec:
    """One machine, complete: what :func:`build_argv` needs and nothing else."""

    vm_id: str
    chipset: Chipset
    accelerator: str  # "kvm" or "tcg"
    cpus: int
    memory: MemorySpec
    paths: RuntimePaths
    firmware: Firmware = SeaBios()
    enlightenments: Enlightenments = Enlightenments()
    block_devices: tuple[BlockDevice, ...] = ()
    net_devices: tuple[NetDevice, ...] = ()
    incoming: bool = False  # wait for saved state on a migration channel (-incoming defer)
    binary: str = "qemu-system-x86_64"
    # Descriptors QEMU inherits under the same numbers; options name them as fd=N or
    # through an fd set (-add-fd fd=N,set=S, then /dev/fdset/S).
    pass_fds: tuple[int, ...] = ()
    hotplug_ports: int = HOTPLUG_PORTS  # q35 only: i440fx hot plugs on its root bus
    layout: PortLayout | None = None  # the running machine's, when restoring it
    # The adapters as release 88d3ce2 placed them (no root ports, no fixed slots; on
    # i440fx after the disks): for restoring a state that release saved, whose stream
    # QEMU can load only into that hardware. No hot plug while it runs.
    legacy_nic_layout: bool = False
    # A named QEMU CPU model every host of a migration can run the same (processor
    # compatibility), which QEMU must provide whole or refuse to start; None: the
    # host's own processor (host under KVM, max under TCG).
    cpu_model: str | None = None

    def __post_init__(self) -> None:
        if self.legacy_nic_layout and self.layout is not None:
            raise InvalidInput("a machine laid out as the previous release did has no "
                               "adapter layout of its own", value="layout")
        devices = ([d.id for d in self.block_devices] + [n.id for n in self.net_devices]
                   + [p.id for p in self.root_ports()])
        nodes = [n.id for d in self.block_devices for n in d.node.chain()]
        netdevs = [n.netdev_id for n in self.net_devices]
        for kind, ids in (("device", devices), ("block node", nodes), ("netdev", netdevs)):
            for ident in ids:
                if not _QEMU_ID.match(ident):
                    raise InvalidInput(f"'{ident}' cannot name a {kind}", value=ident)
                if ids.count(ident) > 1:
                    raise InvalidInput(f"two parts of the machine are the {kind} "
                                       f"'{ident}'; each needs its own identity", value=ident)
        self._check_nic_ports()

    def _check_nic_ports(self) -> None:
        if self.legacy_nic_layout:
            return  # QEMU places every adapter itself
        if self.chipset is not Chipset.Q35:
            self._check_nic_slots()
            return
        ports = {p.id for p in self.root_ports()}
        buses = [self.nic_bus(n) for n in self.net_devices]
        for nic, bus in zip(self.net_devices, buses, strict=True):
            if bus not in ports or buses.count(bus) > 1:
                raise InvalidInput(f"network adapter {nic.mac} has no port of its own in "
                                   f"the machine's layout (port '{bus}')", value=bus)

    def _check_nic_slots(self) -> None:
        if len(self.net_devices) > len(NIC_SLOTS):
            raise InvalidInput(f"a Generation 1 machine has room for {len(NIC_SLOTS)} "
                               f"network adapters; {len(self.net_devices)} were asked for",
                               value=len(self.net_devices))
        slots = [self.nic_slot(n) for n in self.net_devices]
        for nic, slot in zip(self.net_devices, slots, strict=True):
            if slot not in NIC_SLOTS or slots.count(slot) > 1:
                raise InvalidInput(f"network adapter {nic.mac} has no slot of its own in "
                                   f"the machine's layout (slot {slot})", value=str(slot))

    def nic_slot(self, nic: NetDevice) -> int | None:
        """The root-bus slot ``nic`` sits on (i440fx; see :data:`NIC_SLOTS`), or None
        (q35: its root port, :meth:`nic_bus`). Numbered like the q35 ports: by the place
        of its MAC among the adapters' MACs, so a given set of adapters always sits on
        the same slots; a machine whose adapters changed while it ran is rebuilt from
        its :class:`PortLayout`."""
        if self.chipset is not Chipset.I440FX or self.legacy_nic_layout:
            return None
        layout = (self.layout if self.layout is not None
                  else PortLayout.slotted(n.mac for n in self.net_devices))
        return layout.slot_of(nic.mac)

    def root_ports(self) -> tuple[RootPort, ...]:
        """The PCIe root ports of a q35 machine (none on i440fx): one per network
        adapter, then :attr:`hotplug_ports` spare ones.

        An adapter's port is numbered by the place of its MAC among the adapters' MACs
        in sorted order, not by its place in the spec: the same set of adapters always
        gets the same ports, whatever order the user listed them in, so both ends of a
        migration agree and a guest sees the same topology on every start. A machine
        whose adapters changed while it ran is rebuilt from its :class:`PortLayout`.
        """
        if self.chipset is not Chipset.Q35 or self.legacy_nic_layout:
            return ()
        macs = (sorted(self.layout.own) if self.layout is not None
                else sorted(n.mac.lower() for n in self.net_devices))
        nics = [RootPort(nic_port_id(mac), NIC_CHASSIS, slot)
                for slot, mac in enumerate(macs, start=1)]
        spare = [RootPort(hotplug_port_id(i), HOTPLUG_CHASSIS, i + 1)
                 for i in range(self.hotplug_ports)]
        return (*nics, *spare)

    def nic_bus(self, nic: NetDevice) -> str | None:
        """The root port ``nic`` sits on (q35), or None: the root bus (i440fx, and q35
        laid out as the previous release did)."""
        if self.chipset is not Chipset.Q35 or self.legacy_nic_layout:
            return None
        if self.layout is not None:
            return self.layout.port_of(nic.mac)
        return nic_port_id(nic.mac)

    def block_nodes(self) -> tuple[BlockNode, ...]:
        """Every block node of every device, each device's chain nearest first."""
        return tuple(n for d in self.block_devices for n in d.node.chain())
