"""Disk and image routes: /api/v1/disks and /api/v1/images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from hvstack.api.deps import disk_ops_of
from hvstack.api.schemas import (
    DiskConvert,
    DiskCreate,
    DiskFormat,
    DiskPath,
    DiskResize,
    JobView,
)
from hvstack.api.views import job_view
from hvstack.units import parse_size

router = APIRouter(prefix="/api/v1", tags=["storage"])



@router.post("/disks", status_code=201)
async def create_disk(request: Request, body: DiskCreate) -> dict[str, Any]:
    size = parse_size(body.size, what="disk size", bare_unit="G") if body.size is not None else None
    return await disk_ops_of(request).create(body.path, size, body.type, body.parent,
                                             body.format, body.parent_format)


@router.get("/disks/inspect")
async def inspect_disk(request: Request, path: str = Query(...),
                       format: DiskFormat | None = Query(None)) -> dict[str, Any]:
    return await disk_ops_of(request).inspect(path, format)


@router.post("/disks/resize")
async def resize_disk(request: Request, body: DiskResize) -> dict[str, Any]:
    size = parse_size(body.size, what="disk size", bare_unit="G")
    return await disk_ops_of(request).resize(body.path, size, body.allow_shrink, body.format)


@router.post("/disks/convert", response_model=JobView, status_code=202)
async def convert_disk(request: Request, body: DiskConvert) -> JobView:
    return job_view(await disk_ops_of(request).convert(body.source, body.destination,
                                                       body.format, body.source_format))


@router.post("/disks/merge", response_model=JobView, status_code=202)
async def merge_disk(request: Request, body: DiskPath) -> JobView:
    return job_view(await disk_ops_of(request).merge(body.path, body.format))


@router.post("/disks/compact", response_model=JobView, status_code=202)
async def compact_disk(request: Request, body: DiskPath) -> JobView:
    return job_view(await disk_ops_of(request).compact(body.path, body.format))


@router.get("/images")
async def list_images(request: Request) -> list[dict[str, Any]]:
    return await disk_ops_of(request).list_images()


@router.post("/images/{name}/build", response_model=JobView, status_code=202)
async def build_image(request: Request, name: str) -> JobView:
    return job_view(disk_ops_of(request).build_image(name))
