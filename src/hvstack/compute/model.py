"""The VM model: frozen dataclasses for a VM's settings, and their validation.

A :class:`VmConfig` is what the user asked for; it is stored as JSON and turned into a
machine description by :mod:`hvstack.compute.machine`. Validation here is pure (no
I/O): names, counts and enumerations. Paths are confined by :mod:`hvstack.storage.paths`
and sizes against the host by the host service.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import secrets
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from hvstack.errors import InsufficientResources, InvalidInput
from hvstack.hypervisor.spec import NIC_SLOTS
from hvstack.network.model import PortSettings, parse_mac

MAX_NAME_LENGTH = 100
MAX_NOTES_LENGTH = 4000
MIN_MEMORY = 32 * 1024 * 1024
MAX_CPUS = 240
_ID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                      re.IGNORECASE)


class Generation(enum.IntEnum):
    GEN1 = 1  # i440fx + SeaBIOS, IDE boot, emulated devices
    GEN2 = 2  # q35 + OVMF (UEFI), virtio only


class VmState(enum.StrEnum):
    """The VM states, named as Hyper-V names them."""

    OFF = "Off"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    SAVING = "Saving"
    SAVED = "Saved"
    STOPPING = "Stopping"


class AutoStartAction(enum.StrEnum):
    NOTHING = "nothing"
    START_IF_RUNNING = "start-if-running"
    ALWAYS_START = "always-start"


class AutoStopAction(enum.StrEnum):
    SAVE = "save"
    TURN_OFF = "turn-off"
    SHUT_DOWN = "shut-down"


class DiskBus(enum.StrEnum):
    IDE = "ide"
    SCSI = "scsi"
    VIRTIO = "virtio"


class NicModel(enum.StrEnum):
    E1000 = "e1000"
    VIRTIO = "virtio"


class CheckpointType(enum.StrEnum):
    """What ``hv checkpoint create`` makes of a VM, Hyper-V's checkpoint types.

    PRODUCTION: the guest's file systems frozen through the guest agent, disks only (it
    boots fresh when applied); a standard checkpoint when the guest cannot freeze.
    PRODUCTION_ONLY: the same, but failing when the guest cannot freeze. STANDARD: disks
    plus memory and device state (applying it resumes the running guest). DISABLED: none.
    """

    PRODUCTION = "production"
    PRODUCTION_ONLY = "production-only"
    STANDARD = "standard"
    DISABLED = "disabled"


DEFAULT_CHECKPOINT_LIMIT = 50  # Hyper-V's fixed limit; here a VM setting
MAX_CHECKPOINT_LIMIT = 1000


class BootDevice(enum.StrEnum):
    DISK = "disk"
    DVD = "dvd"
    NETWORK = "network"


def disk_id_of(path: str) -> str:
    """The id of a disk recorded before disks had ids: derived from its path, so it is
    the same on every load."""
    return hashlib.sha256(path.encode()).hexdigest()[:DISK_ID_LENGTH]


def new_disk_id() -> str:
    return secrets.token_hex(DISK_ID_LENGTH // 2)


DISK_ID_LENGTH = 10


@dataclass(frozen=True)
class DiskAttachment:
    """A virtual disk attached to a VM; ``path`` is absolute and confined.

    ``format`` is QEMU's name of the format hvstack recorded when it created or attached
    the disk (never probed later); ``owned`` is true for a disk created for this VM (the
    only kind ``delete --delete-disks`` deletes); ``id`` is a stable identity that names
    the disk's nodes and device in QEMU (see :mod:`hvstack.hypervisor.spec`).
    """

    path: str
    bus: DiskBus
    format: str = "qcow2"
    read_only: bool = False
    owned: bool = False
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", disk_id_of(self.path))


USER_MODE = "user"  # QEMU's user-mode NAT inside the VM's process: no privilege needed
SWITCH_MODE = "switch"  # a tap port on a virtual switch of the host
ADAPTER_MODES = (USER_MODE, SWITCH_MODE)


@dataclass(frozen=True)
class NetworkAdapter:
    """A network adapter, named by its MAC (which also names it in QEMU).

    ``mode`` :data:`USER_MODE` is QEMU's user-mode NAT: no switch, default port
    settings. :data:`SWITCH_MODE` is a tap port on the switch with id ``switch``, ""
    when not connected (the adapter is still there, its link down), with Hyper-V's
    per-port settings ``port``. ``dynamic_mac``: the MAC came from the host's pool
    rather than from the user (Hyper-V's dynamic MAC). The MAC is kept in lower case
    with colons; :func:`validate_config` checks it is a usable unicast address.
    """

    mac: str
    model: NicModel
    mode: str = USER_MODE
    switch: str = ""
    port: PortSettings = field(default_factory=PortSettings)
    dynamic_mac: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", self.mac.strip().lower().replace("-", ":"))
        if self.mode not in ADAPTER_MODES:
            raise InvalidInput(f"network adapter mode '{self.mode}' is not one of "
                               f"{', '.join(ADAPTER_MODES)}", value=self.mode)
        if self.mode == USER_MODE and (self.switch or self.port != PortSettings()):
            raise InvalidInput("a user-mode NAT adapter has no switch and no port "
                               "settings; connect it to a switch instead", value=self.mac)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> NetworkAdapter:
        """An adapter as :meth:`to_json` wrote it, or as records before virtual
        switches did (no switch, port or dynamic_mac: a user-mode adapter)."""
        return NetworkAdapter(raw["mac"], NicModel(raw["model"]), raw.get("mode", USER_MODE),
                              raw.get("switch", ""), PortSettings.from_json(raw.get("port")),
                              raw.get("dynamic_mac", False))


@dataclass(frozen=True)
class IntegrationServices:
    """Which integration services a VM offers (Hyper-V's defaults: all but guest
    services). They all talk to the guest agent."""

    heartbeat: bool = True
    shutdown: bool = True
    time_sync: bool = True
    kvp: bool = True
    backup: bool = True
    guest_services: bool = False


INTEGRATION_SERVICES = tuple(f.name for f in dataclasses.fields(IntegrationServices))


class ServiceStatus(enum.StrEnum):
    """An integration service's status while the VM runs (Hyper-V's words); the
    heartbeat of :mod:`hvstack.integration.heartbeat` decides it."""

    OK = "OK"
    NO_CONTACT = "No Contact"
    LOST_COMMUNICATION = "Lost Communication"
    DISABLED = "Disabled"


DEFAULT_MEMORY_BUFFER_PERCENT = 20  # Hyper-V's defaults and ranges
DEFAULT_MEMORY_WEIGHT = 5000
MEMORY_BUFFER_RANGE = (5, 2000)
MEMORY_WEIGHT_RANGE = (0, 10000)
DEFAULT_PROCESSOR_WEIGHT = 100
PROCESSOR_WEIGHT_RANGE = (1, 10000)


@dataclass(frozen=True)
class VmConfig:
    """Everything a user sets on a VM. Immutable: changes make a new config."""

    name: str
    generation: Generation = Generation.GEN2
    cpus: int = 1
    memory_bytes: int = 512 * 1024 * 1024
    notes: str = ""
    disks: tuple[DiskAttachment, ...] = ()
    dvd: str | None = None
    network_adapters: tuple[NetworkAdapter, ...] = ()
    boot_order: tuple[BootDevice, ...] = (BootDevice.DISK, BootDevice.DVD, BootDevice.NETWORK)
    auto_start: AutoStartAction = AutoStartAction.START_IF_RUNNING
    auto_start_delay_seconds: int = 0
    auto_stop: AutoStopAction = AutoStopAction.SAVE
    os_type: str = "linux"
    accelerator: str | None = None  # None: the host's choice
    image: str | None = None
    integration_services: IntegrationServices = IntegrationServices()
    kvp_pool: dict[str, str] = field(default_factory=dict)  # host-to-guest KVP pool
    extra: dict[str, str] = field(default_factory=dict)
    checkpoint_type: CheckpointType = CheckpointType.PRODUCTION
    automatic_checkpoints: bool = False  # one when the VM starts from Off (Hyper-V's)
    checkpoint_limit: int = DEFAULT_CHECKPOINT_LIMIT
    # Dynamic memory (Hyper-V's names): memory_bytes is the startup memory; the VM's
    # assigned memory then follows its demand plus the buffer within [minimum, maximum],
    # shared by weight when the host runs short. None: not yet set (dynamic memory off).
    dynamic_memory: bool = False
    memory_minimum_bytes: int | None = None
    memory_maximum_bytes: int | None = None
    memory_buffer_percent: int = DEFAULT_MEMORY_BUFFER_PERCENT
    memory_weight: int = DEFAULT_MEMORY_WEIGHT
    # Processor resource controls (Hyper-V's names): reserve and limit are percentages
    # of the VM's processors, weight is relative to other VMs' (1-10000).
    processor_reserve_percent: int = 0
    processor_limit_percent: int = 100
    processor_weight: int = DEFAULT_PROCESSOR_WEIGHT
    # Processor compatibility (Hyper-V's CompatibilityForMigrationEnabled): a baseline
    # processor model instead of the host's, so the VM can move between hosts with
    # different processors. Hardware: changed only while the VM is Off.
    processor_compatibility: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> VmConfig:
        raw: dict[str, Any] = json.loads(text)
        raw["generation"] = Generation(raw["generation"])
        raw["disks"] = tuple(
            DiskAttachment(d["path"], DiskBus(d["bus"]), d.get("format", "qcow2"),
                           d.get("read_only", False), d.get("owned", False), d.get("id", ""))
            for d in raw.get("disks", ())
        )
        raw["network_adapters"] = tuple(
            NetworkAdapter.from_json(n) for n in raw.get("network_adapters", ())
        )
        raw["boot_order"] = tuple(BootDevice(b) for b in raw.get("boot_order", ()))
        raw["auto_start"] = AutoStartAction(raw["auto_start"])
        raw["auto_stop"] = AutoStopAction(raw["auto_stop"])
        raw["integration_services"] = IntegrationServices(**raw.get("integration_services", {}))
        raw["checkpoint_type"] = CheckpointType(raw.get("checkpoint_type", "production"))
        known = {f.name for f in dataclasses.fields(VmConfig)}
        return VmConfig(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class VmSettings:
    """What the user wants of a VM: the part every host of a cluster shares.

    ``revision`` is the store's revision of this version (0 before it is stored); a
    change names it, so a change made meanwhile by someone else is refused, not lost.
    """

    id: str
    config: VmConfig
    created_at: float = 0.0
    revision: int = 0


@dataclass(frozen=True)
class VmObserved:
    """What the host that runs a VM observes of it; only that host writes it."""

    state: VmState = VmState.OFF
    reason: str = ""
    pid: int | None = None
    started_at: float | None = None  # wall clock when it last went from Off to Running
    was_running: bool = False  # running when the host service last stopped


@dataclass(frozen=True)
class VmRecord:
    """A VM as its controller sees it: its settings joined with this host's view."""

    id: str
    config: VmConfig
    state: VmState = VmState.OFF
    state_reason: str = ""
    pid: int | None = None
    started_at: float | None = None  # wall clock when it last went from Off to Running
    created_at: float = 0.0
    was_running: bool = False  # running when the host service last stopped
    revision: int = 0  # of the settings

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def settings(self) -> VmSettings:
        return VmSettings(self.id, self.config, self.created_at, self.revision)

    @property
    def observed(self) -> VmObserved:
        return VmObserved(self.state, self.state_reason, self.pid, self.started_at,
                          self.was_running)

    @staticmethod
    def of(settings: VmSettings, observed: VmObserved) -> VmRecord:
        return VmRecord(settings.id, settings.config, observed.state, observed.reason,
                        observed.pid, observed.started_at, settings.created_at,
                        observed.was_running, settings.revision)

    def evolve(self, **changes: object) -> VmRecord:
        return replace(self, **changes)  # type: ignore[arg-type]




def validate_name(name: str, *, what: str = "VM name") -> str:
    """Return ``name`` if it is a usable name; raise InvalidInput saying why if not.

    Names reach file names, logs and terminals, so they may not hold path separators,
    '..', control or format characters (category C: no terminal escapes, no bidi
    overrides) or leading/trailing blanks. Everything else is allowed, as in Hyper-V:
    spaces, '%', '#', '?', quotes, any letter of any script; clients escape names in
    URLs. A name may not have the form of an id (a UUID), so a reference is never both.
    """
    if not name or not name.strip():
        raise InvalidInput(f"{what} must not be empty", value=name)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{what} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed",
            value=name[:MAX_NAME_LENGTH],
        )
    if name != name.strip():
        raise InvalidInput(f"{what} '{name}' must not start or end with blanks", value=name)
    if "/" in name or "\\" in name:
        raise InvalidInput(f"{what} '{name}' must not contain '/' or '\\'", value=name)
    if ".." in name or name == ".":
        raise InvalidInput(f"{what} '{name}' must not contain '..'", value=name)
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidInput(f"{what} {name!r} must not contain control characters", value=repr(name))
    if is_id(name):
        raise InvalidInput(f"{what} '{name}' has the form of an id; choose a name that "
                           "is not a UUID", value=name)
    return name


def is_id(ref: str) -> bool:
    """Whether ``ref`` has the form of an id (a UUID). Such a reference is looked up as an
    id only, never as a name."""
    return _ID_FORM.fullmatch(ref) is not None


def validate_config(config: VmConfig, *, host_cpus: int, host_memory: int) -> VmConfig:
    """Check the settings that need no I/O; raise InvalidInput on the first problem."""
    validate_name(config.name)
    if len(config.notes) > MAX_NOTES_LENGTH:
        raise InvalidInput(f"notes are longer than {MAX_NOTES_LENGTH} characters")
    if not 1 <= config.cpus <= min(MAX_CPUS, host_cpus):
        too_many_for_host = 1 <= config.cpus <= MAX_CPUS
        raise (InsufficientResources if too_many_for_host else InvalidInput)(
            f"processor count {config.cpus} is out of range; this host allows 1 to "
            f"{min(MAX_CPUS, host_cpus)}",
            value=config.cpus,
        )
    if config.memory_bytes < MIN_MEMORY:
        hint = (f"; did you mean {config.memory_bytes}M?"
                if 32 <= config.memory_bytes < 1024 * 1024 else "")
        raise InvalidInput(
            f"memory {config.memory_bytes} bytes is below the minimum of 32 MiB{hint}",
            value=config.memory_bytes,
        )
    if config.memory_bytes % (1024 * 1024):
        raise InvalidInput("memory must be a whole number of MiB", value=config.memory_bytes)
    if config.memory_bytes > host_memory:
        from hvstack.units import format_size

        raise InsufficientResources(
            f"memory {format_size(config.memory_bytes)} is more than this host has "
            f"({format_size(host_memory)})",
            value=config.memory_bytes,
        )
    if not 0 <= config.auto_start_delay_seconds <= 86400:
        raise InvalidInput("automatic start delay must be between 0 and 86400 seconds")
    if config.os_type not in ("linux", "windows", "other"):
        raise InvalidInput(f"os type '{config.os_type}' is not one of linux, windows, other")
    if config.accelerator not in (None, "kvm", "tcg"):
        raise InvalidInput(f"accelerator '{config.accelerator}' is not one of kvm, tcg")
    if len(set(config.boot_order)) != len(config.boot_order):
        raise InvalidInput("boot order names a device twice")
    if not 1 <= config.checkpoint_limit <= MAX_CHECKPOINT_LIMIT:
        raise InvalidInput(f"checkpoint limit {config.checkpoint_limit} is out of range; "
                           f"1 to {MAX_CHECKPOINT_LIMIT} checkpoints are allowed",
                           value=config.checkpoint_limit)
    validate_adapters(config.network_adapters)
    _check_buses(config)
    validate_memory(config, host_memory)
    _check_processor_controls(config)
    return config


DEFAULT_MEMORY_MINIMUM = 512 * 1024 * 1024


def with_memory_defaults(config: VmConfig, host_memory: int) -> VmConfig:
    """``config`` with dynamic memory's bounds filled in where it is on and they are
    not set: minimum min(512 MiB, startup), maximum the host's memory (whole MiB, at
    least the startup)."""
    if not config.dynamic_memory:
        return config
    minimum = config.memory_minimum_bytes
    maximum = config.memory_maximum_bytes
    if minimum is None:
        minimum = min(DEFAULT_MEMORY_MINIMUM, config.memory_bytes)
    if maximum is None:
        maximum = max(config.memory_bytes, host_memory // (1024 * 1024) * 1024 * 1024)
    return replace(config, memory_minimum_bytes=minimum, memory_maximum_bytes=maximum)


def validate_memory(config: VmConfig, host_memory: int) -> None:
    """Dynamic memory's settings, with Hyper-V's ranges: buffer 5-2000 %, weight
    0-10000, minimum <= startup <= maximum in whole MiB, the maximum within the host's
    memory. The bounds are checked only while dynamic memory is on (they are kept, and
    may be stale, while it is off)."""
    from hvstack.units import format_size

    low, high = MEMORY_BUFFER_RANGE
    if not low <= config.memory_buffer_percent <= high:
        raise InvalidInput(f"memory buffer {config.memory_buffer_percent}% is out of range; "
                           f"{low} to {high}% is allowed", value=config.memory_buffer_percent)
    low, high = MEMORY_WEIGHT_RANGE
    if not low <= config.memory_weight <= high:
        raise InvalidInput(f"memory weight {config.memory_weight} is out of range; {low} to "
                           f"{high} is allowed", value=config.memory_weight)
    bounds = (("minimum", config.memory_minimum_bytes),
              ("maximum", config.memory_maximum_bytes))
    for what, size in bounds:
        if size is not None and (size < MIN_MEMORY or size % (1024 * 1024)):
            raise InvalidInput(f"{what} memory {size} bytes must be a whole number of MiB "
                               "and at least 32 MiB", value=size)
    if not config.dynamic_memory:
        return
    minimum, maximum = config.memory_minimum_bytes, config.memory_maximum_bytes
    if minimum is None or maximum is None:
        raise InvalidInput("dynamic memory needs a minimum and a maximum memory")
    startup = config.memory_bytes
    if not minimum <= startup <= maximum:
        raise InvalidInput(
            f"memory sizes are out of order: minimum {format_size(minimum)}, startup "
            f"{format_size(startup)}, maximum {format_size(maximum)}; the minimum must "
            "not exceed the startup memory, nor the startup memory the maximum",
            minimum=minimum, startup=startup, maximum=maximum)
    if maximum > host_memory:
        raise InsufficientResources(
            f"maximum memory {format_size(maximum)} is more than this host has "
            f"({format_size(host_memory)})", value=maximum)


def _check_processor_controls(config: VmConfig) -> None:
    """Hyper-V's ranges: reserve 0-100 %, limit 1-100 % and not below the reserve,
    weight 1-10000."""
    reserve, limit = config.processor_reserve_percent, config.processor_limit_percent
    if not 0 <= reserve <= 100:
        raise InvalidInput(f"processor reserve {reserve}% is out of range; 0 to 100% of "
                           "the VM's processors are allowed", value=reserve)
    if not 1 <= limit <= 100:
        raise InvalidInput(f"processor limit {limit}% is out of range; 1 to 100% of the "
                           "VM's processors are allowed", value=limit)
    if limit < reserve:
        raise InvalidInput(f"processor limit {limit}% is below the processor reserve "
                           f"{reserve}%; the limit must be at least the reserve",
                           value=limit)
    low, high = PROCESSOR_WEIGHT_RANGE
    if not low <= config.processor_weight <= high:
        raise InvalidInput(f"processor weight {config.processor_weight} is out of range; "
                           f"{low} to {high} is allowed", value=config.processor_weight)


def validate_adapters(adapters: tuple[NetworkAdapter, ...]) -> None:
    """Each MAC a usable unicast address (:func:`~hvstack.network.model.parse_mac`),
    and no MAC twice: it names the adapter in QEMU and on the switch."""
    seen: set[str] = set()
    for nic in adapters:
        mac = parse_mac(nic.mac)
        if mac in seen:
            raise InvalidInput(f"MAC address '{nic.mac}' is given to two network adapters",
                               value=nic.mac)
        seen.add(mac)


def _check_buses(config: VmConfig) -> None:
    if config.generation is Generation.GEN1:
        ide_devices = sum(1 for d in config.disks if d.bus is DiskBus.IDE) + bool(config.dvd)
        if ide_devices > 4:
            raise InvalidInput(
                "a Generation 1 VM has two IDE controllers with two devices each; "
                f"{ide_devices} IDE devices were asked for"
            )
        if config.disks and config.disks[0].bus is not DiskBus.IDE:
            raise InvalidInput("a Generation 1 VM boots from IDE: its first disk must be on IDE")
        for nic in config.network_adapters:
            if nic.model is not NicModel.E1000 and not nic.model:
                raise InvalidInput("unknown network adapter model")
        if len(config.network_adapters) > len(NIC_SLOTS):
            raise InvalidInput(f"a Generation 1 VM has room for {len(NIC_SLOTS)} network "
                               f"adapters; {len(config.network_adapters)} were asked for")
    else:
        for disk in config.disks:
            if disk.bus is DiskBus.IDE:
                raise InvalidInput(
                    "a Generation 2 VM has no IDE controller; use the scsi or virtio bus"
                )
        for nic in config.network_adapters:
            if nic.model is NicModel.E1000:
                raise InvalidInput("a Generation 2 VM uses synthetic (virtio) network adapters")
