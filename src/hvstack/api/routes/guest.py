"""Guest operation routes: /api/v1/vms/{ref}/exec, /files, /kvp and /fsfreeze.

A file copy is two requests: ``POST /files`` checks and starts the copy job, then the
bytes travel in the body of ``PUT /files/{id}`` (to the guest; it answers when the file
is in place) or of ``GET /files/{id}`` (from the guest; ``X-Hv-Sha256`` carries the
guest file's sha256, and a copy that fails midway ends the body early).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from hvstack.api.body import streams_body
from hvstack.api.deps import guest_ops_of, service_of
from hvstack.api.guest_schemas import (
    CopyFileRequest,
    CopyFileStarted,
    ExecRequest,
    ExecView,
    FsFreezeRequest,
    FsFreezeView,
    KvpChangeView,
    KvpSet,
    KvpView,
)
from hvstack.api.schemas import JobView
from hvstack.api.views import job_view
from hvstack.errors import Cancelled, InvalidInput
from hvstack.integration.ops import KvpChange

router = APIRouter(prefix="/api/v1/vms", tags=["guest"])




@router.post("/{ref}/exec", response_model=ExecView)
async def exec_in_guest(request: Request, ref: str, body: ExecRequest) -> ExecView:
    stdin = None
    if body.input is not None:
        try:
            stdin = base64.b64decode(body.input, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("input is not base64") from None
    result = await guest_ops_of(request).exec(ref, body.command, stdin=stdin,
                                      timeout=body.timeout_seconds,
                                      max_output=body.max_output_bytes)
    encoding: Literal["utf-8", "base64"] = "utf-8"
    try:
        out, err = result.stdout.decode(), result.stderr.decode()
    except UnicodeDecodeError:
        out = base64.b64encode(result.stdout).decode()
        err = base64.b64encode(result.stderr).decode()
        encoding = "base64"
    return ExecView(exit_code=result.exit_code, signal=result.signal, stdout=out, stderr=err,
                    encoding=encoding,
                    truncated=result.truncated, stdout_truncated=result.stdout_truncated,
                    stderr_truncated=result.stderr_truncated, pid=result.pid,
                    duration_seconds=round(result.seconds, 4))


@router.post("/{ref}/files", response_model=CopyFileStarted, status_code=202)
async def start_copy(request: Request, ref: str, body: CopyFileRequest) -> CopyFileStarted:
    copies = guest_ops_of(request).copies
    if body.direction == "to-guest":
        if body.size is None:
            raise InvalidInput("a copy into the guest needs the size of the file")
        transfer = await copies.start_upload(ref, body.guest_path, body.size, body.sha256,
                                             create_dirs=body.create_dirs,
                                             overwrite=body.overwrite)
    else:
        transfer = await copies.start_download(ref, body.guest_path)
    return CopyFileStarted(
        transfer_id=transfer.id, data_url=f"/api/v1/vms/{transfer.vm_id}/files/{transfer.id}",
        direction=transfer.direction, guest_path=transfer.guest_path, size=transfer.size,
        sha256=transfer.sha256, job=job_view(service_of(request).jobs.get(transfer.id)),
    )


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise Cancelled("the client went away during the upload") from None


@router.put("/{ref}/files/{transfer_id}", response_model=JobView)
@streams_body  # the copy checks the bytes against the size it announced
async def upload(request: Request, ref: str, transfer_id: str) -> JobView:
    service = service_of(request)
    job = await guest_ops_of(request).copies.feed(service.get_vm(ref), transfer_id,
                                                  _body(request))
    return job_view(service.jobs.get(job.id))


@router.get("/{ref}/files/{transfer_id}", response_class=StreamingResponse)
async def download(request: Request, ref: str, transfer_id: str) -> StreamingResponse:
    vm = service_of(request).get_vm(ref)
    transfer, chunks = guest_ops_of(request).copies.stream(vm, transfer_id)
    headers = {"Content-Length": str(transfer.size), "X-Hv-Sha256": transfer.sha256 or "",
               "X-Hv-Guest-Path": transfer.guest_path}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


def _change(change: KvpChange) -> KvpChangeView:
    return KvpChangeView(key=change.key, value=change.value, pushed=change.pushed,
                         push_error=change.push_error, host=change.host)


@router.get("/{ref}/kvp", response_model=KvpView)
async def kvp_list(request: Request, ref: str) -> KvpView:
    listing = await guest_ops_of(request).kvp_list(ref)
    return KvpView(host=listing.host, guest=listing.guest,
                   intrinsic=listing.intrinsic.to_dict() if listing.intrinsic else None,
                   guest_available=listing.guest_available, guest_error=listing.guest_error,
                   ignored_guest_lines=listing.ignored_guest_lines)


@router.put("/{ref}/kvp", response_model=KvpChangeView)
async def kvp_set(request: Request, ref: str, body: KvpSet) -> KvpChangeView:
    return _change(await guest_ops_of(request).kvp_set(ref, body.key, body.value))


@router.delete("/{ref}/kvp", response_model=KvpChangeView)
async def kvp_delete(request: Request, ref: str, key: str = Query(...)) -> KvpChangeView:
    return _change(await guest_ops_of(request).kvp_delete(ref, key))


@router.post("/{ref}/fsfreeze", response_model=FsFreezeView)
async def fsfreeze(request: Request, ref: str, body: FsFreezeRequest) -> FsFreezeView:
    status = await guest_ops_of(request).fsfreeze(ref, body.action, body.hold_seconds)
    return FsFreezeView(status=status.status, filesystems=status.filesystems,
                        holds=status.holds, auto_thaw_at=status.auto_thaw_at)
