"""Resource metering of the host's VMs (Hyper-V's Enable-VMResourceMetering, Measure-VM,
Reset-VMResourceMetering, Disable-VMResourceMetering) and the live readings /metrics
exports.

:class:`Metering` keeps, for each VM with metering enabled, the
:class:`~hvstack.metering.model.Totals` since it was enabled or last reset, in the store
under ``metering/<vm id>`` (written at each sample, compare-and-swap on the record's
revision so a VM deleted meanwhile, which deletes its record in the same transaction,
never gets it back). A sampler task (every ``HostConfig.metering_interval`` seconds,
from :meth:`Metering.start` to :meth:`Metering.close`) samples each metered VM whose
worker runs; a VM that begins to save or shut down is sampled at once (its worker still
runs), and :meth:`Metering.measure` samples before it reports. A sample is the worker's
CPU time and the taps' bytes (:mod:`hvstack.host.metering_probe`), the block devices'
bytes (``query-blockstats``) and the assigned memory: :attr:`Metering.memory` gives it
(by default the VM's configured memory; the dynamic memory balancer's reading once
wired). Totals survive restarts of QEMU and of the service: see
:mod:`hvstack.metering.accounting`.

:meth:`Metering.live` reads the raw counters of every VM with a worker, metered or not,
at the moment it is called (the /metrics scrape): cheap reads, nothing stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import SWITCH_MODE, VmRecord, VmState
from hvstack.errors import HvError, MeteringDisabled, NotFound, StaleRevision
from hvstack.host.metering_probe import CounterProbe, LinuxCounters
from hvstack.host.records import METERING
from hvstack.host.service import HostService
from hvstack.host.store import Store
from hvstack.metering.accounting import add, begin, report
from hvstack.metering.model import DiskIo, Report, Sample, Totals, Traffic

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0  # one VM's block statistics over QMP
SAMPLE_STATES = (VmState.SAVING, VmState.STOPPING)  # a last sample while the worker runs


@dataclass(frozen=True)
class MemoryReading:
    """A running VM's memory: what it is assigned, and what its guest uses (None:
    unknown)."""

    assigned_bytes: int
    demand_bytes: int | None = None


@dataclass(frozen=True)
class HostMemory:
    """The host's memory as the VMs share it (``reserved``: None until known)."""

    total_bytes: int
    reserved_bytes: int | None
    assigned_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class LiveVm:
    """A VM's raw counters now (None: it has no worker, or the value could not be
    read). The counters are its worker's, from zero when it started."""

    id: str
    name: str
    state: VmState
    cpu_seconds: float | None = None
    memory: MemoryReading | None = None
    disk_read_bytes: int | None = None
    disk_written_bytes: int | None = None
    adapters: tuple[tuple[str, Traffic], ...] = ()  # (MAC, bytes) of metered adapters


@dataclass(frozen=True)
class Measurement:
    vm: str
    vm_id: str
    enabled: bool
    report: Report


class MeteringRecords:
    """Each metered VM's totals under ``metering/<vm id>``, with its revision."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> dict[str, tuple[Totals, int]]:
        return {e.key.removeprefix(METERING): (Totals.from_json(e.value), e.revision)
                for e in await self.store.scan(METERING)}

    async def save(self, vm_id: str, totals: Totals, expected: int) -> int:
        """Write ``totals``; StaleRevision unless the record is at ``expected`` (0: it
        must not exist)."""
        return await self.store.put(METERING + vm_id, totals.to_json(), expected=expected)

    async def delete(self, vm_id: str) -> None:
        await self.store.delete(METERING + vm_id)


class Metering:
    def __init__(self, service: HostService, tap_name: Callable[[str, str], str],
                 probe: CounterProbe | None = None) -> None:
        self.service = service
        self.records = MeteringRecords(service.store)
        self.probe: CounterProbe = probe if probe is not None else LinuxCounters()
        self._tap_name = tap_name
        self.interval = service.config.metering_interval
        # Wired by the composition root: the balancer's reading of a VM (None: use the
        # VM's configured memory) and its host summary (None: the host's facts).
        self.memory: Callable[[str], MemoryReading | None] = lambda vm_id: None
        self.host_memory: Callable[[], HostMemory | None] = lambda: None
        self._totals: dict[str, tuple[Totals, int]] = {}
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        service.registry.state_hooks.append(self._state_changed)

    # -- the service's start and stop ------------------------------------------------

    async def start(self) -> None:
        """Load the records (dropping those of VMs that are gone) and start sampling."""
        await self._load()
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._run(), name="metering-sampler")

    async def close(self) -> None:
        tasks = [t for t in (self._sampler, *self._tasks) if t is not None]
        self._sampler = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=READ_TIMEOUT * 2)

    async def _load(self) -> None:
        async with self._load_lock:
            if self._loaded:
                return
            known = {vm.record.id for vm in self.service.list_vms()}
            for vm_id, entry in (await self.records.load()).items():
                if vm_id in known:
                    self._totals[vm_id] = entry
                else:  # its VM was deleted by a service that had no metering yet
                    await self.records.delete(vm_id)
            self._loaded = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.wait_for(self.sample_all(), max(self.interval, READ_TIMEOUT * 2))
            except TimeoutError:
                log.warning("metering: a round of samples took too long; the next one "
                            "continues from the last sample read")
            except Exception:  # a bug must not end metering for good
                log.exception("metering: a round of samples failed")

    async def sample_all(self) -> None:
        """Sample every metered VM whose worker runs."""
        await self._load()
        registered = {vm.record.id: vm for vm in self.service.list_vms()}
        for vm_id in [i for i in self._totals if i not in registered]:
            del self._totals[vm_id]  # deleted: its record went with it
            self._locks.pop(vm_id, None)
        vms = [vm for vm in registered.values()
               if vm.record.id in self._totals and vm.machine_running]
        await asyncio.gather(*(self._sample(vm) for vm in vms))

    def _state_changed(self, record: VmRecord) -> None:
        if record.state not in SAMPLE_STATES or record.id not in self._totals:
            return
        try:
            vm = self.service.get_vm(record.id)
        except NotFound:
            return
        task = asyncio.get_running_loop().create_task(self._sample(vm),
                                                      name=f"metering-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- operations -------------------------------------------------------------------

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _measurement(self, vm: VmController, totals: Totals, enabled: bool = True
                     ) -> Measurement:
        return Measurement(vm.record.name, vm.record.id, enabled, report(totals, time.time()))

    async def _save(self, vm: VmController, totals: Totals, expected: int) -> bool:
        """Record ``totals``; False (and forgotten) if the VM or its record went."""
        vm_id = vm.record.id
        if not self.service.registry.holds(vm):
            self._totals.pop(vm_id, None)
            return False
        try:
            revision = await self.records.save(vm_id, totals, expected)
        except StaleRevision:
            log.info("VM %s: its metering record changed or went meanwhile", vm.record.name)
            self._totals.pop(vm_id, None)
            return False
        self._totals[vm_id] = (totals, revision)
        return True

    async def _sample(self, vm: VmController) -> None:
        async with self._lock(vm.record.id):
            entry = self._totals.get(vm.record.id)
            if entry is None:
                return
            sample = await self._read(vm)
            if sample is not None:
                await self._save(vm, add(entry[0], sample), entry[1])

    def _enabled(self, vm: VmController) -> tuple[Totals, int]:
        entry = self._totals.get(vm.record.id)
        if entry is None:
            raise MeteringDisabled(vm.record.name)
        return entry

    async def enable(self, ref: str) -> Measurement:
        """Start metering the VM (nothing changes if it is metered already)."""
        await self._load()
        vm = self.service.get_vm(ref)
        async with self._lock(vm.record.id):
            entry = self._totals.get(vm.record.id)
            if entry is None:
                totals = await self._begin(vm)
                if not await self._save(vm, totals, 0):
                    raise NotFound(f"VM '{vm.record.name}' was deleted", vm=vm.record.name)
                entry = self._totals[vm.record.id]
            return self._measurement(vm, entry[0])

    async def _begin(self, vm: VmController) -> Totals:
        running = vm.machine_running
        return begin(time.time(), await self._read(vm) if running else None, running=running)

    async def reset(self, ref: str) -> Measurement:
        """Start the totals again from now."""
        await self._load()
        vm = self.service.get_vm(ref)
        async with self._lock(vm.record.id):
            _, revision = self._enabled(vm)
            totals = await self._begin(vm)
            if not await self._save(vm, totals, revision):
                raise MeteringDisabled(vm.record.name)
            return self._measurement(vm, totals)

    async def measure(self, ref: str) -> Measurement:
        """Measure-VM: the totals with a sample taken now if the VM runs."""
        await self._load()
        vm = self.service.get_vm(ref)
        async with self._lock(vm.record.id):
            totals, revision = self._enabled(vm)
            if vm.machine_running and (sample := await self._read(vm)) is not None:
                totals = add(totals, sample)
                if not await self._save(vm, totals, revision):
                    raise MeteringDisabled(vm.record.name)
            return self._measurement(vm, totals)

    async def disable(self, ref: str) -> Measurement:
        """Stop metering the VM and drop its totals; returns them as they were last."""
        await self._load()
        vm = self.service.get_vm(ref)
        async with self._lock(vm.record.id):
            totals, _ = self._enabled(vm)
            if vm.machine_running and (sample := await self._read(vm)) is not None:
                totals = add(totals, sample)
            await self.records.delete(vm.record.id)
            self._totals.pop(vm.record.id, None)
            return self._measurement(vm, totals, enabled=False)

    # -- reading the counters -----------------------------------------------------------

    def _memory_of(self, vm: VmController) -> MemoryReading:
        reading = self.memory(vm.record.id)
        return reading if reading is not None else MemoryReading(
            vm.record.config.memory_bytes)

    def _adapters(self, vm: VmController) -> dict[str, Traffic | None]:
        """Each adapter's tap counters; None for an adapter without a tap (user-mode);
        a switch adapter whose tap cannot be read now is left out of this sample."""
        found: dict[str, Traffic | None] = {}
        for nic in vm.record.config.network_adapters:
            if nic.mode != SWITCH_MODE:
                found[nic.mac] = None
            elif (traffic := self.probe.tap(self._tap_name(vm.record.id, nic.mac))) is not None:
                found[nic.mac] = traffic
        return found

    async def _disks(self, vm: VmController) -> dict[str, DiskIo] | None:
        try:
            machine = vm.running_machine()
            stats = await asyncio.wait_for(machine.block_jobs.io_stats(), READ_TIMEOUT)
        except (HvError, TimeoutError) as exc:
            log.debug("VM %s: no block statistics: %s", vm.record.name, exc)
            return None
        return {s.device: DiskIo(s.read_bytes, s.write_bytes) for s in stats}

    async def _read(self, vm: VmController) -> Sample | None:
        """A sample of the VM's worker; None when it has none or it cannot be read
        whole (a partial one would count a device again when it is back)."""
        try:
            pid = vm.running_machine().pid
        except HvError:
            return None
        disks = await self._disks(vm)
        times = self.probe.process(pid)
        if disks is None or times is None:
            return None
        return Sample(time.time(), times.identity, times.started_at, times.cpu_seconds,
                      self._memory_of(vm).assigned_bytes, disks, self._adapters(vm))

    async def _live(self, vm: VmController) -> LiveVm:
        record = vm.record
        try:
            pid = vm.running_machine().pid
        except HvError:
            return LiveVm(record.id, record.name, record.state)
        disks = await self._disks(vm)
        times = self.probe.process(pid)
        adapters = tuple((mac, t) for mac, t in self._adapters(vm).items() if t is not None)
        return LiveVm(
            record.id, record.name, record.state,
            cpu_seconds=times.cpu_seconds if times is not None else None,
            memory=self._memory_of(vm),
            disk_read_bytes=None if disks is None else sum(d.read for d in disks.values()),
            disk_written_bytes=(None if disks is None
                                else sum(d.written for d in disks.values())),
            adapters=adapters)

    async def live(self) -> tuple[list[LiveVm], HostMemory]:
        """Every VM's raw counters now, and the host's memory."""
        vms = await asyncio.gather(*(self._live(vm) for vm in self.service.list_vms()))
        summary = self.host_memory()
        if summary is None:
            assigned = sum(v.memory.assigned_bytes for v in vms if v.memory is not None)
            summary = HostMemory(self.service.facts.memory_bytes, None, assigned,
                                 self.service.host.available_memory())
        return list(vms), summary
