"""Turning domain objects into API views."""

from __future__ import annotations

from typing import Any

from hvstack.api.problems import problem_body
from hvstack.api.schemas import JobView, VmView
from hvstack.compute.lifecycle import VmController
from hvstack.host.jobs import Job
from hvstack.host.service import HostService


def vm_data(vm: VmController, service: HostService) -> dict[str, Any]:
    """A VM as plain JSON data, the shape of :class:`VmView` (built without validation:
    listing a thousand VMs must stay cheap)."""
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
        "disks": [{"path": d.path, "bus": d.bus.value, "format": d.format}
                  for d in config.disks],
        "dvd": config.dvd,
        "network_adapters": [{"mac": n.mac, "model": n.model.value, "mode": n.mode}
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
    }


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
        created_at=job.created_at,
        finished_at=job.finished_at,
    )
