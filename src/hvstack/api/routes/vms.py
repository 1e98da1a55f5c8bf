"""VM routes: /api/v1/vms and the operations on one VM."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse

from hvstack.api.deps import service_of
from hvstack.api.routes.network import full_vm_view
from hvstack.api.schemas import (
    MAX_WAIT_SECONDS,
    DiskAttach,
    DvdSet,
    JobView,
    RestartRequest,
    StopRequest,
    VmCreate,
    VmUpdate,
    VmView,
    WaitCondition,
    WaitView,
)
from hvstack.api.views import job_view, vm_view, vms_json
from hvstack.compute.model import (
    AutoStartAction,
    AutoStopAction,
    BootDevice,
    CheckpointType,
    DiskBus,
    Generation,
    VmConfig,
)
from hvstack.compute.policy import StopMode
from hvstack.errors import InvalidInput
from hvstack.host import vm_wait
from hvstack.host.service import NewVm
from hvstack.units import parse_size

router = APIRouter(prefix="/api/v1/vms", tags=["vms"])


@router.get("", response_model=list[VmView])
async def list_vms(request: Request) -> Response:
    service = service_of(request)
    return Response(vms_json(service.list_vms(), service), media_type="application/json")


@router.post("", response_model=VmView, status_code=201)
async def create_vm(request: Request, body: VmCreate) -> VmView:
    service = service_of(request)
    config = VmConfig(
        name=body.name,
        generation=Generation(body.generation),
        cpus=body.cpus,
        memory_bytes=parse_size(body.memory, what="memory", bare_unit="M"),
        notes=body.notes,
        dvd=body.dvd,
        auto_start=AutoStartAction(body.auto_start),
        auto_start_delay_seconds=body.auto_start_delay_seconds,
        auto_stop=AutoStopAction(body.auto_stop),
        os_type=body.os_type,
        accelerator=body.accelerator,
    )
    if body.boot_order is not None:
        config = replace(config, boot_order=tuple(BootDevice(b) for b in body.boot_order))
    new_disk = (parse_size(body.new_disk, what="disk size", bare_unit="G")
                if body.new_disk is not None else None)
    vm = await service.create_vm(NewVm(config, image=body.image, disk=body.disk,
                                       new_disk_bytes=new_disk, disk_format=body.disk_format,
                                       switches=tuple(body.switches),
                                       network=not body.no_network))
    return await full_vm_view(request, vm)


@router.get("/{ref}", response_model=VmView)
async def show_vm(request: Request, ref: str) -> VmView:
    """A VM, its adapters with their switch's name and the guest's addresses."""
    return await full_vm_view(request, service_of(request).get_vm(ref))


@router.patch("/{ref}", response_model=VmView)
async def update_vm(request: Request, ref: str, body: VmUpdate) -> VmView:
    service = service_of(request)
    changes: dict[str, Any] = {}
    fields = body.model_dump(exclude_none=True)
    for key in ("name", "notes", "cpus", "os_type", "auto_start_delay_seconds",
                "automatic_checkpoints", "checkpoint_limit", "processor_reserve_percent",
                "processor_limit_percent", "processor_weight", "processor_compatibility"):
        if key in fields:
            changes[key] = fields[key]
    if "memory" in fields:
        changes["memory_bytes"] = parse_size(fields["memory"], what="memory", bare_unit="M")
    changes |= _memory_changes(fields)
    if "boot_order" in fields:
        changes["boot_order"] = tuple(BootDevice(b) for b in fields["boot_order"])
    if "auto_start" in fields:
        changes["auto_start"] = AutoStartAction(fields["auto_start"])
    if "auto_stop" in fields:
        changes["auto_stop"] = AutoStopAction(fields["auto_stop"])
    if "checkpoint_type" in fields:
        changes["checkpoint_type"] = CheckpointType(fields["checkpoint_type"])
    if body.integration_services is not None:
        current = service.get_vm(ref).record.config.integration_services
        changes["integration_services"] = replace(
            current, **body.integration_services.model_dump(exclude_none=True))
    if "accelerator" in fields:
        changes["accelerator"] = None if fields["accelerator"] == "auto" else fields["accelerator"]
    vm = await service.update_vm(ref, **changes) if changes else service.get_vm(ref)
    return vm_view(vm, service)


def _memory_changes(fields: dict[str, Any]) -> dict[str, Any]:
    """Dynamic memory's fields of a change, sizes parsed (bare numbers below 1 MiB
    refused with a hint, as for the memory)."""
    changes: dict[str, Any] = {}
    if "memory_startup" in fields:
        if "memory" in fields:
            raise InvalidInput("give the startup memory once: memory or memory_startup")
        changes["memory_bytes"] = parse_size(fields["memory_startup"],
                                             what="startup memory", bare_unit="M")
    for key, name in (("memory_minimum", "minimum memory"),
                      ("memory_maximum", "maximum memory")):
        if key in fields:
            changes[f"{key}_bytes"] = parse_size(fields[key], what=name, bare_unit="M")
    for key in ("dynamic_memory", "memory_buffer_percent", "memory_weight"):
        if key in fields:
            changes[key] = fields[key]
    return changes


@router.delete("/{ref}")
async def delete_vm(request: Request, ref: str,
                    delete_disks: bool = Query(False)) -> dict[str, Any]:
    return await service_of(request).delete_vm(ref, delete_disks=delete_disks)


@router.post("/{ref}/start", response_model=JobView, status_code=202)
async def start_vm(request: Request, ref: str) -> JobView:
    return job_view(service_of(request).start_vm(ref))


@router.post("/{ref}/stop", response_model=JobView, status_code=202)
async def stop_vm(request: Request, ref: str, body: StopRequest | None = None) -> JobView:
    body = body or StopRequest()
    job = service_of(request).stop_vm(ref, StopMode(body.mode), body.force, body.timeout_seconds)
    return job_view(job)


@router.post("/{ref}/save", response_model=JobView, status_code=202)
async def save_vm(request: Request, ref: str) -> JobView:
    return job_view(service_of(request).stop_vm(ref, StopMode.SAVE))


@router.post("/{ref}/restart", response_model=JobView, status_code=202)
async def restart_vm(request: Request, ref: str, body: RestartRequest | None = None) -> JobView:
    body = body or RestartRequest()
    return job_view(service_of(request).restart_vm(ref, body.timeout_seconds))


@router.post("/{ref}/pause", response_model=VmView)
async def pause_vm(request: Request, ref: str) -> VmView:
    service = service_of(request)
    return vm_view(await service.pause_vm(ref), service)


@router.post("/{ref}/resume", response_model=VmView)
async def resume_vm(request: Request, ref: str) -> VmView:
    service = service_of(request)
    return vm_view(await service.resume_vm(ref), service)


@router.post("/{ref}/disks", response_model=VmView)
async def attach_disk(request: Request, ref: str, body: DiskAttach) -> VmView:
    service = service_of(request)
    bus = DiskBus(body.bus) if body.bus else None
    return vm_view(await service.attach_disk(ref, body.path, bus, body.format), service)


@router.delete("/{ref}/disks", response_model=VmView)
async def detach_disk(request: Request, ref: str, path: str = Query(...)) -> VmView:
    service = service_of(request)
    return vm_view(await service.detach_disk(ref, path), service)


@router.put("/{ref}/dvd", response_model=VmView)
async def set_dvd(request: Request, ref: str, body: DvdSet) -> VmView:
    service = service_of(request)
    return vm_view(await service.set_dvd(ref, body.iso), service)


@router.get("/{ref}/console-log", response_class=PlainTextResponse)
async def console_log(request: Request, ref: str,
                      max_bytes: int = Query(65536, ge=1, le=16 * 1024 * 1024)) -> Response:
    return PlainTextResponse(service_of(request).console_log(ref, max_bytes))


@router.get("/{ref}/wait", response_model=WaitView, responses={504: {
    "description": "the condition did not hold within the timeout (problem "
                   "/problems/wait-timeout)"}})
async def wait_vm(request: Request, ref: str,
                  condition: WaitCondition = Query(..., alias="for"),
                  timeout: float = Query(300.0, gt=0, le=MAX_WAIT_SECONDS)) -> Response:
    """Answer once the VM meets the condition (Hyper-V's Wait-VM): a long poll."""
    waiter = asyncio.ensure_future(
        vm_wait.wait_for(service_of(request), ref, vm_wait.WaitFor(condition), timeout))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, gone):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if not waiter.done() or waiter.cancelled():
        return Response(status_code=499)  # the client went away; nobody reads this
    reached = waiter.result()  # raises the waiter's HvError: a problem response
    view = WaitView(vm=reached.vm, condition=reached.condition.value,
                    state=reached.state.value, heartbeat=reached.heartbeat.value,
                    ip_addresses=list(reached.addresses))
    return Response(view.model_dump_json(), media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (a long poll it gave up on)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
