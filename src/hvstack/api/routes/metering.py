"""Resource metering of a VM: ``POST /api/v1/vms/{ref}/metering/enable|disable|reset``
and ``GET /api/v1/vms/{ref}/metering`` (Measure-VM; 409 ``metering-disabled`` while
metering is not enabled)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hvstack.api.deps import metering_of
from hvstack.api.metering_schemas import MeteringView, metering_view

router = APIRouter(prefix="/api/v1/vms", tags=["metering"])


@router.get("/{ref}/metering", response_model=MeteringView)
async def measure(request: Request, ref: str) -> MeteringView:
    """The totals since metering was enabled or last reset, sampled now."""
    return metering_view(await metering_of(request).measure(ref))


@router.post("/{ref}/metering/enable", response_model=MeteringView)
async def enable(request: Request, ref: str) -> MeteringView:
    """Start metering (nothing changes if the VM is metered already)."""
    return metering_view(await metering_of(request).enable(ref))


@router.post("/{ref}/metering/reset", response_model=MeteringView)
async def reset(request: Request, ref: str) -> MeteringView:
    """Start the totals again from now."""
    return metering_view(await metering_of(request).reset(ref))


@router.post("/{ref}/metering/disable", response_model=MeteringView)
async def disable(request: Request, ref: str) -> MeteringView:
    """Stop metering; the answer holds the last totals, which are dropped."""
    return metering_view(await metering_of(request).disable(ref))
