"""Turning domain objects into API views."""

from __future__ import annotations

import functools
import json
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hvstack.api.problems import problem_body
from hvstack.api.schemas import JobView, VmView
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import INTEGRATION_SERVICES, IntegrationServices, VmRecord
from hvstack.host.jobs import Job
from hvstack.host.service import HostService
from hvstack.integration.heartbeat import service_status


@dataclass(frozen=True)
class _Rendered:
    record: VmRecord
    data: dict[str, Any]
    json: bytes


# The view of a VM at rest (no worker process) changes only with its record, which is
# replaced, never mutated: listing a thousand mostly idle VMs reuses data and JSON.
_at_rest: weakref.WeakKeyDictionary[VmController, _Rendered] = weakref.WeakKeyDictionary()


def _render(vm: VmController, service: HostService) -> _Rendered:
    cached = _at_rest.get(vm)
    if cached is not None and cached.record is vm.record and not vm.machine_running:
        return cached
    data = _build_vm_data(vm, service)
    rendered = _Rendered(vm.record, data, json.dumps(data, separators=(",", ":")).encode())
    if not vm.machine_running:
        _at_rest[vm] = rendered
    return rendered


def vm_data(vm: VmController, service: HostService) -> dict[str, Any]:
    """A VM as plain JSON data, the shape of :class:`VmView` (built without validation:
    listing a thousand VMs must stay cheap). Callers must not change it."""
    return _render(vm, service).data


def vms_json(vms: Iterable[VmController], service: HostService) -> bytes:
    """A JSON array of VM views, joined from each VM's (cached) JSON."""
    return b"[" + b",".join(_render(vm, service).json for vm in vms) + b"]"


def _build_vm_data(vm: VmController, service: HostService) -> dict[str, Any]:
    record, config = vm.record, vm.record.config
    return {
        "id": record.id,
        "name": record.name,
        "state": record.state.value,
        "state_reason": record.state_reason,
        "generation": int(config.generation),
        "cpus": config.cpus,
        "memory_bytes": config.memory_bytes,
        "notes": config.notes,
        "disks": [{"path": d.path, "bus": d.bus.value, "format": d.format, "owned": d.owned,
                   "id": d.id}
                  for d in config.disks],
        "dvd": config.dvd,
        "network_adapters": [{"mac": n.mac, "model": n.model.value, "mode": n.mode,
                              "switch": n.switch, "dynamic_mac": n.dynamic_mac,
                              "port": n.port.to_json()}
                             for n in config.network_adapters],
        "boot_order": [b.value for b in config.boot_order],
        "auto_start": config.auto_start.value,
        "auto_start_delay_seconds": config.auto_start_delay_seconds,
        "auto_stop": config.auto_stop.value,
        "os_type": config.os_type,
        "accelerator": service.accelerator_for(config),
        "image": config.image,
        "pid": record.pid,
        "uptime_seconds": int(vm.uptime()),
        "created_at": record.created_at,
        "folder": str(vm.files.folder),
        "heartbeat": vm.link.heartbeat.value if vm.machine_running else None,
        "integration_services": integration_data(vm),
        "checkpoint_type": config.checkpoint_type.value,
        "automatic_checkpoints": config.automatic_checkpoints,
        "checkpoint_limit": config.checkpoint_limit,
        **memory_data(vm, service),
        **processor_data(vm, service),
    }


def memory_data(vm: VmController, service: HostService) -> dict[str, Any]:
    """Dynamic memory's settings, and the balancer's last reading while the VM runs."""
    config = vm.record.config
    reading = service.memory.reading(vm.record.id) if vm.machine_running else None
    return {
        "dynamic_memory": config.dynamic_memory,
        "memory_minimum_bytes": config.memory_minimum_bytes,
        "memory_maximum_bytes": config.memory_maximum_bytes,
        "memory_buffer_percent": config.memory_buffer_percent,
        "memory_weight": config.memory_weight,
        "memory_assigned_bytes": reading.assigned if reading else None,
        "memory_demand_bytes": reading.demand if reading else None,
        "memory_status": reading.status.value if reading and reading.status else None,
        "memory_status_reason": reading.reason if reading else "",
    }


def processor_data(vm: VmController, service: HostService) -> dict[str, Any]:
    """The processor resource controls and whether they are in force."""
    config = vm.record.config
    status = service.processor.status(vm.record)
    return {"processor_reserve_percent": config.processor_reserve_percent,
            "processor_limit_percent": config.processor_limit_percent,
            "processor_weight": config.processor_weight,
            "processor_compatibility": config.processor_compatibility,
            "processor_controls": status.detail,
            "processor_controls_in_force": status.in_force}


@functools.lru_cache(maxsize=64)
def _services_at_rest(settings: IntegrationServices) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {
        name: {"enabled": bool(getattr(settings, name)), "status": None}
        for name in INTEGRATION_SERVICES
    }
    data["heartbeat"]["last_contact"] = None
    return data


def integration_data(vm: VmController) -> dict[str, dict[str, Any]]:
    """Each integration service: enabled, and its status while the VM runs."""
    settings = vm.record.config.integration_services
    running = vm.machine_running
    if not running:
        return _services_at_rest(settings)  # shared and read-only: listings stay cheap
    data: dict[str, dict[str, Any]] = {}
    for name in INTEGRATION_SERVICES:
        enabled = bool(getattr(settings, name))
        status = (vm.link.heartbeat if name == "heartbeat"
                  else service_status(enabled, vm.link.status))
        data[name] = {"enabled": enabled, "status": status.value if running else None}
    data["heartbeat"]["last_contact"] = vm.link.last_contact
    return data


def vm_view(vm: VmController, service: HostService) -> VmView:
    return VmView.model_validate(vm_data(vm, service))


def job_view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        kind=job.kind,
        target=job.target,
        state=job.state.value,
        progress=round(job.progress, 1),
        message=job.message,
        result=job.result,
        error=problem_body(job.error) if job.error else None,
        created_at=datetime.fromtimestamp(job.created_at, UTC),
        finished_at=(datetime.fromtimestamp(job.finished_at, UTC)
                     if job.finished_at is not None else None),
        duration_seconds=round((job.finished_at or time.time()) - job.created_at, 3),
    )
