"""Checkpoints of the host's VMs: the tree in the store, and every operation on it.

:class:`CheckpointOperations` keeps each VM's :class:`~hvstack.checkpoints.model.CheckpointTree`
(``checkpoints/<vm id>`` in the store, cached here) and offers the operations the API,
the CLI and the other host operations use: create, list, apply, rename (this module),
delete with its merge (:mod:`hvstack.host.checkpoint_merge`). Every operation that
changes disk files holds the VM's :class:`~hvstack.host.block_work.BlockWork` claim;
every change of the tree is stored with :meth:`CheckpointOperations.store`, together
with the VM's settings when its disk paths change (one transaction: the store never
names a file the other does not).
"""

from __future__ import annotations

import logging

from hvstack.checkpoints.model import Checkpoint, CheckpointTree
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmConfig
from hvstack.errors import Conflict
from hvstack.host.jobs import Job
from hvstack.host.records import CheckpointRecords
from hvstack.host.service import HostService

log = logging.getLogger(__name__)


class CheckpointOperations:
    def __init__(self, service: HostService) -> None:
        self.service = service
        self.records = CheckpointRecords(service.store)
        self._trees: dict[str, CheckpointTree] = {}

    async def tree_of(self, vm: VmController) -> CheckpointTree:
        """The VM's checkpoint tree (empty if it has none)."""
        tree = self._trees.get(vm.record.id)
        if tree is None:
            tree = self._trees[vm.record.id] = await self.records.load(vm.record.id)
        return tree

    async def store(self, vm: VmController, tree: CheckpointTree,
                    config: VmConfig | None = None) -> None:
        """Store ``tree`` and, if given and changed, the VM's new settings ``config``
        in one transaction. The caller holds ``vm.lock``."""
        op = CheckpointRecords.op(vm.record.id, tree)
        if config is None or config == vm.record.config:
            await self.service.store.commit([op])
        else:
            await self.service.provisioning.store_config(vm, config, also=[op])
        self._trees[vm.record.id] = tree
        self.service.events.publish("vm.checkpoints", vm=vm.record.name, id=vm.record.id)

    # -- the operations (H1: create, list, apply, rename) ----------------------------

    async def list(self, ref: str) -> tuple[VmController, CheckpointTree]:
        """The VM ``ref`` names and its checkpoint tree."""
        vm = self.service.get_vm(ref)
        return vm, await self.tree_of(vm)

    async def create(self, ref: str, name: str | None = None) -> Job:
        """Start a job that checkpoints VM ``ref`` (its checkpoint type decides how)."""
        raise Conflict("creating checkpoints is not there yet")

    async def apply(self, ref: str, checkpoint: str, save_current: bool = False) -> Job:
        """Start a job that returns VM ``ref`` to ``checkpoint``."""
        raise Conflict("applying checkpoints is not there yet")

    async def rename(self, ref: str, checkpoint: str, name: str) -> Checkpoint:
        vm = self.service.get_vm(ref)
        async with vm.lock:
            tree = await self.tree_of(vm)
            renamed = tree.renamed(checkpoint, name)
            if renamed is not tree:
                await self.store(vm, renamed)
            return renamed.get(tree.get(checkpoint).id)

    def forget(self, vm_id: str) -> None:
        """Drop the cached tree of a deleted VM (its record went with the VM's)."""
        self._trees.pop(vm_id, None)
