"""Export and import routes: ``POST /api/v1/vms/{ref}/export``,
``POST /api/v1/vms/{ref}/checkpoints/{checkpoint}/export`` (jobs with progress),
``POST /api/v1/imports/check`` (the import's check, which changes nothing) and
``POST /api/v1/imports`` (a job; 400 listing every problem when the check fails)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from hvstack.api.deps import export_ops_of, import_ops_of
from hvstack.api.export_schemas import ExportRequest, ImportBody, ImportCheckView
from hvstack.api.schemas import JobView
from hvstack.api.views import job_view
from hvstack.host.import_ops import ImportRequest

router = APIRouter(prefix="/api/v1", tags=["exports"])


def _import_request(body: ImportBody) -> ImportRequest:
    return ImportRequest(body.path, body.mode, body.new_id, body.name, body.dest)


@router.post("/vms/{ref}/export", response_model=JobView, status_code=202)
async def export_vm(request: Request, ref: str, body: ExportRequest) -> JobView:
    return job_view(export_ops_of(request).export_vm(ref, body.path))


@router.post("/vms/{ref}/checkpoints/{checkpoint}/export", response_model=JobView,
             status_code=202)
async def export_checkpoint(request: Request, ref: str, checkpoint: str,
                            body: ExportRequest) -> JobView:
    return job_view(await export_ops_of(request).export_checkpoint(ref, checkpoint, body.path))


@router.post("/imports/check", response_model=ImportCheckView)
async def check_import(request: Request, body: ImportBody) -> dict[str, Any]:
    return (await import_ops_of(request).check(_import_request(body))).to_dict()


@router.post("/imports", response_model=JobView, status_code=202)
async def import_vm(request: Request, body: ImportBody) -> JobView:
    return job_view(await import_ops_of(request).import_vm(_import_request(body)))
