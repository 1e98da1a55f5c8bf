"""Typed views of the store: VMs and jobs, so no raw key or dict crosses a package.

The keys (a cluster's hosts share the first two kinds, each host writes its own third)::

    vms/settings/<id>           a VM's settings and creation time (VmSettings)
    vms/names/<name>            <id>: a name is taken by one VM at a time
    vms/observed/<host>/<id>    what <host> observes of it (VmObserved)
    jobs/<id>                   a job's record (JobRecord)
    switches/<id>               a virtual switch (network.model.Switch)
    switches/names/<name>       <id>: a name is taken by one switch at a time
    network/default-switch      "made": the Default Switch was made once (a deleted
                                one is not made again)
    checkpoints/<vm id>         the VM's checkpoint tree (checkpoints.model.CheckpointTree)
    metering/<vm id>            the VM's resource metering totals (metering.model.Totals;
                                absent: metering is not enabled); kept by
                                hvstack.host.metering

:class:`VmRecords` creates, changes (compare-and-swap on the settings' revision) and
deletes VMs and records their observed state; :class:`JobRecords` keeps the jobs;
:class:`SwitchRecords` the switches (compare-and-swap as VM settings);
:class:`CheckpointRecords` each VM's checkpoint tree, changed together with the VM's
settings in one transaction when a checkpoint changes the VM's disk paths.
:class:`Writer` lets synchronous code (a state change, a job's bookkeeping) record
through the asynchronous store in order: the newest value of each key is written, and
``flush`` waits for what was queued and raises the error of a key's last write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hvstack.checkpoints.model import CheckpointTree
from hvstack.compute.model import VmConfig, VmObserved, VmRecord, VmSettings, VmState
from hvstack.errors import AlreadyExists, HvError, StaleRevision
from hvstack.host.store import Delete, Op, Put, Store
from hvstack.network.model import Switch

log = logging.getLogger(__name__)

LOCAL_HOST = "local"  # this host's name in the keys until hosts have cluster identities
SETTINGS = "vms/settings/"
NAMES = "vms/names/"
OBSERVED = "vms/observed/"
JOBS = "jobs/"
SWITCHES = "switches/"
SWITCH_NAMES = "switches/names/"
DEFAULT_SWITCH_MADE = "network/default-switch"
CHECKPOINTS = "checkpoints/"
METERING = "metering/"


@dataclass(frozen=True)
class JobRecord:
    """What survives of a job: enough to show it, not to resume it.

    ``result`` is the job's result as JSON text; ``error_type`` the slug of its error.
    """

    id: str
    kind: str
    target: str
    state: str
    created_at: float
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None
    error_type: str | None = None


def _settings_value(config: VmConfig, created_at: float) -> str:
    return json.dumps({"config": json.loads(config.to_json()), "created_at": created_at},
                      sort_keys=True)


def _observed_value(observed: VmObserved) -> str:
    return json.dumps(dataclasses.asdict(observed), sort_keys=True)


def _observed(text: str) -> VmObserved:
    raw: dict[str, Any] = json.loads(text)
    return VmObserved(VmState(raw["state"]), raw["reason"], raw["pid"], raw["started_at"],
                      raw["was_running"])


def v1_vm(vm_id: str, name: str, config: dict[str, Any], created_at: float,
          observed: dict[str, Any]) -> list[tuple[str, str]]:
    """The keys of a VM recorded by schema 1 (one row of ``vms``)."""
    return [
        (SETTINGS + vm_id, json.dumps({"config": config, "created_at": created_at},
                                      sort_keys=True)),
        (NAMES + name, vm_id),
        (f"{OBSERVED}{LOCAL_HOST}/{vm_id}", json.dumps(observed, sort_keys=True)),
    ]


def v1_job(*row: Any) -> tuple[str, str]:
    """The key of a job recorded by schema 1 (one row of ``jobs``)."""
    return JOBS + row[0], json.dumps(dataclasses.asdict(JobRecord(*row)))


class VmRecords:
    def __init__(self, store: Store, host: str = LOCAL_HOST) -> None:
        self.store = store
        self._observed = f"{OBSERVED}{host}/"

    async def load(self) -> list[VmRecord]:
        """Every VM, oldest first, with what this host observes of it (Off if nothing)."""
        seen = {e.key.removeprefix(self._observed): _observed(e.value)
                for e in await self.store.scan(self._observed)}
        records = []
        for entry in await self.store.scan(SETTINGS):
            raw = json.loads(entry.value)
            vm_id = entry.key.removeprefix(SETTINGS)
            settings = VmSettings(vm_id, VmConfig.from_json(json.dumps(raw["config"])),
                                  raw["created_at"], entry.revision)
            records.append(VmRecord.of(settings, seen.get(vm_id, VmObserved())))
        return sorted(records, key=lambda r: r.created_at)

    async def _commit(self, ops: list[Op], name: str) -> int:
        try:
            return await self.store.commit(ops)
        except StaleRevision as exc:
            if exc.data.get("key") == NAMES + name:
                raise AlreadyExists(f"a VM named '{name}' already exists", vm=name) from None
            raise

    async def create(self, record: VmRecord, also: Sequence[Op] = ()) -> VmRecord:
        """Store a new VM, and ``also`` in the same transaction; AlreadyExists if its
        name is taken."""
        revision = await self._commit([
            Put(NAMES + record.name, record.id, expected=0),
            Put(SETTINGS + record.id, _settings_value(record.config, record.created_at),
                expected=0),
            Put(self._observed + record.id, _observed_value(record.observed)),
            *also,
        ], record.name)
        return record.evolve(revision=revision)

    async def change(self, old: VmRecord, config: VmConfig,
                     also: Sequence[Op] = ()) -> VmRecord:
        """Store new settings of ``old``, and ``also`` in the same transaction;
        StaleRevision if they changed since ``old`` was read, AlreadyExists if a new
        name is taken."""
        ops: list[Op] = [Put(SETTINGS + old.id, _settings_value(config, old.created_at),
                             expected=old.revision), *also]
        if config.name != old.name:
            ops += [Delete(NAMES + old.name), Put(NAMES + config.name, old.id, expected=0)]
        try:
            revision = await self._commit(ops, config.name)
        except StaleRevision as exc:
            raise StaleRevision(f"the settings of VM '{old.name}' were changed meanwhile; "
                                "read them again and retry", vm=old.name) from exc
        return old.evolve(config=config, revision=revision)

    async def observe(self, vm_id: str, observed: VmObserved) -> None:
        await self.store.put(self._observed + vm_id, _observed_value(observed))

    async def delete(self, record: VmRecord) -> None:
        await self.store.commit([Delete(SETTINGS + record.id), Delete(NAMES + record.name),
                                 Delete(self._observed + record.id),
                                 Delete(CHECKPOINTS + record.id),
                                 Delete(METERING + record.id)])


class CheckpointRecords:
    """Each VM's checkpoint tree under ``checkpoints/<vm id>`` (absent: no checkpoints)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self, vm_id: str) -> CheckpointTree:
        entry = await self.store.get(CHECKPOINTS + vm_id)
        return CheckpointTree() if entry is None else CheckpointTree.from_json(entry.value)

    @staticmethod
    def op(vm_id: str, tree: CheckpointTree) -> Op:
        """The write of ``tree``, for a transaction (see :meth:`VmRecords.change`)."""
        if not tree.checkpoints and tree.pending is None and not tree.made:
            return Delete(CHECKPOINTS + vm_id)
        return Put(CHECKPOINTS + vm_id, tree.to_json())

    async def save(self, vm_id: str, tree: CheckpointTree) -> None:
        await self.store.commit([self.op(vm_id, tree)])


class JobRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> list[JobRecord]:
        jobs = [JobRecord(**json.loads(e.value)) for e in await self.store.scan(JOBS)]
        return sorted(jobs, key=lambda j: j.created_at)

    async def save(self, job: JobRecord) -> None:
        await self.store.put(JOBS + job.id, json.dumps(dataclasses.asdict(job)))

    async def forget(self, job_id: str) -> None:
        await self.store.delete(JOBS + job_id)


@dataclass(frozen=True)
class StoredSwitch:
    switch: Switch
    revision: int = 0


class SwitchRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> list[StoredSwitch]:
        found = [StoredSwitch(Switch.from_json(json.loads(e.value)), e.revision)
                 for e in await self.store.scan(SWITCHES)
                 if not e.key.startswith(SWITCH_NAMES)]
        return sorted(found, key=lambda s: s.switch.name)

    async def _commit(self, ops: list[Op], name: str) -> int:
        try:
            return await self.store.commit(ops)
        except StaleRevision as exc:
            if exc.data.get("key") == SWITCH_NAMES + name:
                raise AlreadyExists(f"a switch named '{name}' already exists",
                                    switch=name) from None
            raise StaleRevision(f"switch '{name}' was changed meanwhile; read it again "
                                "and retry", switch=name) from exc

    async def create(self, switch: Switch) -> StoredSwitch:
        ops: list[Op] = [Put(SWITCH_NAMES + switch.name, switch.id, expected=0),
                         Put(SWITCHES + switch.id, _switch_value(switch), expected=0)]
        if switch.default:
            ops.append(Put(DEFAULT_SWITCH_MADE, "made"))
        return StoredSwitch(switch, await self._commit(ops, switch.name))

    async def change(self, old: StoredSwitch, new: Switch) -> StoredSwitch:
        ops: list[Op] = [Put(SWITCHES + old.switch.id, _switch_value(new),
                             expected=old.revision)]
        if new.name != old.switch.name:
            ops += [Delete(SWITCH_NAMES + old.switch.name),
                    Put(SWITCH_NAMES + new.name, new.id, expected=0)]
        return StoredSwitch(new, await self._commit(ops, new.name))

    async def delete(self, old: StoredSwitch) -> None:
        await self._commit([Delete(SWITCHES + old.switch.id, expected=old.revision),
                            Delete(SWITCH_NAMES + old.switch.name)], old.switch.name)

    async def default_made(self) -> bool:
        return await self.store.get(DEFAULT_SWITCH_MADE) is not None


def _switch_value(switch: Switch) -> str:
    return json.dumps(switch.to_json(), sort_keys=True)


class Writer:
    """Records from synchronous code through the asynchronous store, one key at a time
    in the order queued; a newer write of a key replaces one not yet made."""

    def __init__(self) -> None:
        self._pending: dict[str, Callable[[], Awaitable[object]]] = {}
        self._errors: dict[str, HvError] = {}
        self._task: asyncio.Task[None] | None = None

    def write(self, key: str, write: Callable[[], Awaitable[object]]) -> None:
        self._pending.pop(key, None)
        self._pending[key] = write
        self._errors.pop(key, None)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(),
                                                                name="store-writer")

    async def _drain(self) -> None:
        while self._pending:
            key = next(iter(self._pending))
            write = self._pending.pop(key)
            try:
                await write()
            except HvError as exc:
                self._errors[key] = exc
                log.error("cannot record %s: %s", key, exc)
            except Exception:  # a bug must not stop the writes that follow
                log.exception("cannot record %s", key)

    async def flush(self, key: str | None = None) -> None:
        """Wait until everything queued is written; raise the error of ``key``'s last
        write, if it failed."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if key is not None and (error := self._errors.pop(key, None)) is not None:
            raise error
