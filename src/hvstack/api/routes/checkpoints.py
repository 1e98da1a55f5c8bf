"""Checkpoint routes: /api/v1/vms/{ref}/checkpoints and the operations on one.

Create and apply are jobs (202 with the job); list, show and rename answer at once.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from hvstack.api.checkpoint_schemas import (
    CheckpointApply,
    CheckpointCreate,
    CheckpointList,
    CheckpointRename,
    CheckpointView,
)
from hvstack.api.deps import checkpoint_ops_of
from hvstack.api.schemas import JobView
from hvstack.api.views import job_view
from hvstack.checkpoints.model import Checkpoint, CheckpointTree
from hvstack.compute.lifecycle import VmController

router = APIRouter(prefix="/api/v1/vms", tags=["checkpoints"])


def checkpoint_view(checkpoint: Checkpoint, tree: CheckpointTree) -> CheckpointView:
    return CheckpointView(id=checkpoint.id, name=checkpoint.name, parent=checkpoint.parent,
                          created_at=checkpoint.created_at, kind=checkpoint.kind.value,
                          automatic=checkpoint.automatic, disks=dict(checkpoint.disks),
                          memory_state=checkpoint.memory_state is not None,
                          current=tree.current == checkpoint.id)


def list_view(vm: VmController, tree: CheckpointTree) -> CheckpointList:
    config = vm.record.config
    return CheckpointList(vm=vm.record.name, vm_id=vm.record.id, current=tree.current,
                          checkpoint_type=config.checkpoint_type.value,
                          checkpoint_limit=config.checkpoint_limit,
                          checkpoints=[checkpoint_view(c, tree) for c in tree.checkpoints])


@router.get("/{ref}/checkpoints", response_model=CheckpointList)
async def list_checkpoints(request: Request, ref: str) -> CheckpointList:
    vm, tree = await checkpoint_ops_of(request).listing(ref)
    return list_view(vm, tree)


@router.post("/{ref}/checkpoints", response_model=JobView, status_code=202)
async def create_checkpoint(request: Request, ref: str,
                            body: CheckpointCreate | None = None) -> JobView:
    body = body or CheckpointCreate()
    return job_view(await checkpoint_ops_of(request).create(ref, body.name))


@router.get("/{ref}/checkpoints/{checkpoint}", response_model=CheckpointView)
async def show_checkpoint(request: Request, ref: str, checkpoint: str) -> CheckpointView:
    _, tree = await checkpoint_ops_of(request).listing(ref)
    return checkpoint_view(tree.get(checkpoint), tree)


@router.patch("/{ref}/checkpoints/{checkpoint}", response_model=CheckpointView)
async def rename_checkpoint(request: Request, ref: str, checkpoint: str,
                            body: CheckpointRename) -> CheckpointView:
    ops = checkpoint_ops_of(request)
    renamed = await ops.rename(ref, checkpoint, body.name)
    _, tree = await ops.listing(ref)
    return checkpoint_view(renamed, tree)


@router.post("/{ref}/checkpoints/{checkpoint}/apply", response_model=JobView,
             status_code=202)
async def apply_checkpoint(request: Request, ref: str, checkpoint: str,
                           body: CheckpointApply | None = None) -> JobView:
    body = body or CheckpointApply()
    return job_view(await checkpoint_ops_of(request).apply(ref, checkpoint,
                                                           body.save_current))


# H2: DELETE /{ref}/checkpoints/{checkpoint}?subtree= goes below this line.


@router.delete("/{ref}/checkpoints/{checkpoint}", response_model=JobView, status_code=202)
async def delete_checkpoint(request: Request, ref: str, checkpoint: str,
                            subtree: bool = False) -> JobView:
    """The checkpoint (``subtree``: and every one below it) leaves the tree at once;
    the job merges the files it no longer needs."""
    return job_view(await checkpoint_ops_of(request).delete(ref, checkpoint, subtree))
