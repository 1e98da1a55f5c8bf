"""The API's typed requests and views (pydantic). Requests reject unknown fields.

These are the one typed request per operation that every client sends: the CLI and the
Python client build them, the web UI posts the same JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


Size = int | str
AutoStart = Literal["nothing", "start-if-running", "always-start"]
AutoStop = Literal["save", "turn-off", "shut-down"]
BootDevice = Literal["disk", "dvd", "network"]
Bus = Literal["ide", "scsi", "virtio"]
# A disk's format; without it, the extension decides (.qcow2, .vhdx, .vhd, .raw/.img).
DiskFormat = Literal["qcow2", "raw", "vhdx", "vhd"]
CheckpointType = Literal["production", "production-only", "standard", "disabled"]


class VmCreate(Request):
    name: str
    generation: Literal[1, 2] = 2
    cpus: int = Field(1, ge=1)
    memory: Size = "512M"
    notes: str = ""
    image: str | None = None
    disk: str | None = None
    disk_format: DiskFormat | None = None
    new_disk: Size | None = None
    dvd: str | None = None
    boot_order: list[BootDevice] | None = None
    auto_start: AutoStart = "start-if-running"
    auto_start_delay_seconds: int = Field(0, ge=0)
    auto_stop: AutoStop = "save"
    os_type: Literal["linux", "windows", "other"] = "linux"
    accelerator: Literal["kvm", "tcg"] | None = None
    switches: list[str] = []  # one adapter on each (names or ids)
    no_network: bool = False  # no adapter at all


class IntegrationServicesUpdate(Request):
    heartbeat: bool | None = None
    shutdown: bool | None = None
    time_sync: bool | None = None
    kvp: bool | None = None
    backup: bool | None = None
    guest_services: bool | None = None


class VmUpdate(Request):
    name: str | None = None
    notes: str | None = None
    cpus: int | None = Field(None, ge=1)
    memory: Size | None = None
    boot_order: list[BootDevice] | None = None
    auto_start: AutoStart | None = None
    auto_start_delay_seconds: int | None = Field(None, ge=0)
    auto_stop: AutoStop | None = None
    os_type: Literal["linux", "windows", "other"] | None = None
    accelerator: Literal["kvm", "tcg", "auto"] | None = None
    integration_services: IntegrationServicesUpdate | None = None
    checkpoint_type: CheckpointType | None = None
    automatic_checkpoints: bool | None = None
    checkpoint_limit: int | None = Field(None, ge=1, le=1000)
    # Dynamic memory (Hyper-V's names; ranges checked with the other settings):
    # memory_startup is the same setting as memory.
    dynamic_memory: bool | None = None
    memory_startup: Size | None = None
    memory_minimum: Size | None = None
    memory_maximum: Size | None = None
    memory_buffer_percent: int | None = None
    memory_weight: int | None = None
    # Processor resource controls (ranges checked by the service: one message for all).
    processor_reserve_percent: int | None = None
    processor_limit_percent: int | None = None
    processor_weight: int | None = None
    # Processor compatibility (a baseline CPU model for migration): only while Off.
    processor_compatibility: bool | None = None


class StopRequest(Request):
    mode: Literal["shut-down", "turn-off", "save", "discard-saved-state"] = "shut-down"
    force: bool = False
    timeout_seconds: float | None = Field(None, ge=0, le=3600)


WaitCondition = Literal["heartbeat", "ip", "running", "off"]
MAX_WAIT_SECONDS = 86400.0


class WaitView(BaseModel):
    """``GET /vms/{ref}/wait``: the condition held; the VM's facts at that moment."""

    vm: str
    condition: WaitCondition
    state: str
    heartbeat: str
    ip_addresses: list[str]


class RestartRequest(Request):
    timeout_seconds: float | None = Field(None, ge=0, le=3600)


class DiskAttach(Request):
    path: str
    bus: Bus | None = None
    format: DiskFormat | None = None


class DvdSet(Request):
    iso: str | None = None


class DiskCreate(Request):
    path: str
    size: Size | None = None
    type: Literal["fixed", "dynamic", "differencing"] | None = None
    parent: str | None = None
    format: DiskFormat | None = None
    parent_format: DiskFormat | None = None


class DiskResize(Request):
    path: str
    size: Size
    allow_shrink: bool = False
    format: DiskFormat | None = None


class DiskConvert(Request):
    source: str
    destination: str
    format: DiskFormat | None = None
    source_format: DiskFormat | None = None


class DiskPath(Request):
    path: str
    format: DiskFormat | None = None


class DiskView(BaseModel):
    path: str
    bus: str
    format: str
    owned: bool = False
    id: str = ""


class NicView(BaseModel):
    mac: str
    model: str
    mode: str  # "user" (user-mode NAT) or "switch"
    switch: str = ""  # the switch's id; "" when not connected
    switch_name: str | None = None  # shown by GET /vms/{ref} and the adapter routes
    dynamic_mac: bool = False
    port: dict[str, Any] = {}  # Hyper-V's port settings (network.model.PortSettings)
    ip_addresses: list[str] = []  # the guest's, from its agent, while it runs
    # Packets and bytes each ACL of the port matched (index into port.acls), while the
    # VM runs; shown by GET /vms/{ref}/adapters.
    acl_counters: list[dict[str, Any]] = []


class VmView(BaseModel):
    id: str
    name: str
    state: str
    state_reason: str
    generation: int
    cpus: int
    memory_bytes: int
    notes: str
    disks: list[DiskView]
    dvd: str | None
    network_adapters: list[NicView]
    boot_order: list[str]
    auto_start: str
    auto_start_delay_seconds: int
    auto_stop: str
    os_type: str
    accelerator: str
    image: str | None
    pid: int | None
    uptime_seconds: int
    created_at: float
    folder: str
    heartbeat: str | None = None
    integration_services: dict[str, dict[str, Any]] = {}
    checkpoint_type: str = "production"
    automatic_checkpoints: bool = False
    checkpoint_limit: int = 50
    # Dynamic memory: the settings (memory_bytes is the startup memory), and while the
    # VM runs what the balancer last saw: assigned, the guest's demand (None until it
    # reports), the status (OK, Low, Warning; None with static memory) and why.
    dynamic_memory: bool = False
    memory_minimum_bytes: int | None = None
    memory_maximum_bytes: int | None = None
    memory_buffer_percent: int = 20
    memory_weight: int = 5000
    memory_assigned_bytes: int | None = None
    memory_demand_bytes: int | None = None
    memory_status: str | None = None
    memory_status_reason: str = ""
    processor_reserve_percent: int = 0
    processor_limit_percent: int = 100
    processor_weight: int = 100
    processor_compatibility: bool = Field(
        False, description="a baseline processor model, so the VM can move between hosts "
                           "with different processors")
    processor_controls: str = Field(
        "", description='"in force", "applied when the VM starts" or "not applied: why"')
    processor_controls_in_force: bool = False


class JobView(BaseModel):
    id: str
    kind: str
    target: str
    state: str
    progress: float
    message: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime = Field(description="ISO 8601, UTC")
    finished_at: datetime | None = Field(description="ISO 8601, UTC; null while running")
    duration_seconds: float = Field(description="from creation to the end (or to now)")


class HostView(BaseModel):
    hostname: str
    version: str
    cpus: int
    memory_bytes: int
    accelerator: str
    accelerator_reason: str
    qemu_version: str
    data_dir: str
    storage_roots: list[str]
    images_dir: str
    vm_count: int
    running_vm_count: int
    uptime_seconds: int
    # Memory for VMs: memory_bytes is the host's total; reserved for the host itself,
    # the configured limit (None: none), assigned to running VMs, available beyond it.
    memory_reserved_bytes: int = 0
    memory_limit_bytes: int | None = None
    memory_assigned_bytes: int = 0
    memory_available_bytes: int = 0
    processor_controls: str = Field(
        "", description="the cgroup version and controller used, or why there is none")
