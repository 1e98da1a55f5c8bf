"""Host, job and event routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from functools import cache

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from hvstack import __version__
from hvstack.api.deps import service_of
from hvstack.api.schemas import HostView, JobView
from hvstack.api.views import job_view
from hvstack.compute.model import VmState

router = APIRouter(prefix="/api/v1", tags=["host"])



@cache
def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


@router.get("/host", response_model=HostView)
async def host_info(request: Request) -> HostView:
    service = service_of(request)
    vms = service.list_vms()
    memory = service.memory.host_summary()
    return HostView(
        hostname=socket.gethostname(),
        version=__version__,
        cpus=service.facts.cpus,
        memory_bytes=service.facts.memory_bytes,
        accelerator=service.facts.accelerator.name,
        accelerator_reason=service.facts.accelerator.reason,
        qemu_version=await asyncio.to_thread(qemu_version, service.config.qemu_binary),
        data_dir=str(service.config.data_dir),
        storage_roots=[str(r) for r in service.config.storage_roots],
        images_dir=str(service.config.images_dir),
        vm_count=len(vms),
        running_vm_count=sum(vm.state is not VmState.OFF and vm.state is not VmState.SAVED
                             for vm in vms),
        uptime_seconds=int(time.time() - service.started_at),
        memory_reserved_bytes=memory.reserved,
        memory_limit_bytes=memory.limit,
        memory_assigned_bytes=memory.assigned,
        memory_available_bytes=memory.available,
        processor_controls=service.processor.summary(),
    )


@router.get("/jobs", response_model=list[JobView])
async def list_jobs(request: Request) -> list[JobView]:
    return [job_view(job) for job in service_of(request).jobs.list()]


@router.get("/jobs/{job_id}", response_model=JobView)
async def show_job(request: Request, job_id: str,
                   wait: float = Query(0, ge=0, le=60,
                                       description="seconds to wait for the job to end")
                   ) -> JobView:
    job = service_of(request).jobs.get(job_id)
    if wait:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait)
    return job_view(job)


@router.post("/jobs/{job_id}/cancel", response_model=JobView)
async def cancel_job(request: Request, job_id: str) -> JobView:
    service = service_of(request)
    job = service.jobs.cancel_running(job_id)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.done.wait(), 10)
    return job_view(job)


@router.get("/events")
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: one ``data:`` line of JSON per event, a comment every 15 s."""
    service = service_of(request)
    subscription = service.events.subscribe()

    async def stream() -> AsyncIterator[str]:
        try:
            yield ": hvstack events\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(anext(subscription), 15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                payload = {"seq": event.seq, "type": event.type, "time": event.time,
                           **event.data}
                yield f"event: {event.type}\ndata: {json.dumps(payload)}\n\n"
        finally:
            await subscription.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")
