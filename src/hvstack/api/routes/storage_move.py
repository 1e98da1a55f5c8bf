"""Live storage migration: ``POST /api/v1/vms/{ref}/move-storage`` starts a job.

The body names the destination folder (inside the storage roots), optionally the disks
to move (their paths; default all), whether checkpoint files move with them (default
yes) and a bandwidth limit ("50M": bytes per second). Bad input is 4xx at once; the
job's result lists what moved and what stayed, and why.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from hvstack.api.deps import storage_moves_of
from hvstack.api.schemas import JobView
from hvstack.api.schemas import Request as Body
from hvstack.api.views import job_view
from hvstack.units import parse_size

router = APIRouter(prefix="/api/v1", tags=["storage"])


class MoveStorage(Body):
    destination: str
    disks: list[str] = Field(default_factory=list)
    include_checkpoints: bool = True
    bandwidth: int | str | None = None


@router.post("/vms/{ref}/move-storage", response_model=JobView, status_code=202)
async def move_storage(request: Request, ref: str, body: MoveStorage) -> JobView:
    bandwidth = None
    if body.bandwidth is not None:
        bandwidth = parse_size(body.bandwidth, what="bandwidth")
    return job_view(await storage_moves_of(request).move(
        ref, body.destination, body.disks, include_checkpoints=body.include_checkpoints,
        bandwidth=bandwidth))
