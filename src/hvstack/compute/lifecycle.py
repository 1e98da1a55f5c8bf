"""The lifecycle of one VM: start, stop, turn off, pause, resume, save, restart, reattach.

A :class:`VmController` owns a VM's record and its worker process handle. Operations on
one VM are serialised by its lock; different VMs run side by side. Every state change
goes through :meth:`VmController._set`, which checks it against the state machine
(:mod:`hvstack.compute.states`; a move it lacks is refused as a programming error),
persists the record and publishes an event (through the ``on_change`` callback the host
service supplies). An operation's steps come from the machine: :meth:`_step`.

Failures: the state in memory is the truth while the service runs. An operation that
fails, or is cancelled, leaves the VM in the state it is really in, asked from QEMU
(``query-status``; Off when the worker process is gone), never in a transition such as
Saving. A store that cannot record a change (a full disk) fails the operation before it
begins (:class:`~hvstack.errors.NoSpace`); once the VM has really changed, the change
is kept and published, the failure to record it logged (the next change records the
whole record again, and after a restart the real state is found by reattaching).

A disk error QEMU reports is told in the user's terms by :mod:`hvstack.compute.io_errors`
(and may pause the VM); where the VM's files live is :mod:`hvstack.compute.files`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from hvstack.compute import io_errors, nics
from hvstack.compute.files import VmFiles as VmFiles  # its older home; callers import it here
from hvstack.compute.model import IntegrationServices, ServiceStatus, VmRecord, VmState
from hvstack.compute.policy import ShutdownStep, shutdown_chain
from hvstack.compute.policy import StopMode as StopMode  # its older home; callers import it here
from hvstack.compute.states import Operation, can_move, next_state, require
from hvstack.errors import (
    HvError,
    HypervisorError,
    InsufficientResources,
    InvalidTransition,
    NoSpace,
)
from hvstack.hypervisor.driver import Driver, Machine
from hvstack.hypervisor.events import BlockIoError, QmpEvent
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.agent import GuestAgent
from hvstack.hypervisor.spec import MachineSpec
from hvstack.progress import Progress, scaled

log = logging.getLogger(__name__)

STATUS_TIMEOUT = 10.0  # asking QEMU its run state after a failure
EXIT_GRACE = 2.0  # for a worker that stopped answering to show it has exited


class AgentLink(Protocol):
    """The guest agent's heartbeat while the worker runs: whether the agent answers
    (``status``), and the guest clock. :class:`hvstack.integration.heartbeat.GuestLink`
    is the one the host service gives (``make_link``)."""

    status: ServiceStatus
    last_contact: float | None

    @property
    def heartbeat(self) -> ServiceStatus: ...

    async def run(self) -> None: ...

    async def sync_time(self) -> bool: ...


# (agent, the VM's services, whether the guest runs, on a status change, on contact)
LinkFactory = Callable[[GuestAgent, Callable[[], IntegrationServices], Callable[[], bool],
                        Callable[[ServiceStatus, ServiceStatus], None],
                        Callable[[], Awaitable[None]]], AgentLink]


class VmController:
    def __init__(
        self,
        record: VmRecord,
        files: VmFiles,
        driver: Driver,
        spec_for: Callable[[VmRecord, bool], MachineSpec],
        on_change: Callable[[VmRecord], None],
        before_start: Callable[[VmRecord], Awaitable[None]],
        publish: Callable[..., object] = lambda *a, **k: None,
        on_guest_contact: Callable[[VmController], Awaitable[None]] | None = None,
        recorded: Callable[[VmRecord], Awaitable[None]] | None = None,
        *,
        make_link: LinkFactory,
        on_adapter_gone: Callable[[VmController, str], Awaitable[None]] | None = None,
    ) -> None:
        self.record = record
        self.files = files
        self.lock = asyncio.Lock()
        self._driver = driver
        self._spec_for = spec_for
        self._on_change = on_change
        self._recorded = recorded or (lambda record: _nothing())
        self._before_start = before_start
        # Called (in the lock) with the MAC of an adapter the guest let go of after its
        # hot remove gave up waiting: the host takes it out of the settings.
        self._on_adapter_gone = on_adapter_gone
        self._machine: Machine | None = None
        # The guest agent channel; calls fail with AgentUnavailable while nothing runs.
        self.agent = GuestAgent(str(files.qga_socket), record.name)
        self._publish = publish
        self.link = make_link(
            self.agent,
            lambda: self.record.config.integration_services,
            lambda: self.state is VmState.RUNNING,
            self._on_link_status,
            lambda: on_guest_contact(self) if on_guest_contact else _nothing(),
        )
        self._link_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[object]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._expect_exit = False
        self._busy = False  # an operation drives the state; QMP events do not
        self._memory_saved = False  # held still, the memory was saved (QEMU postmigrate)

    # -- state ---------------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self.record.state

    def _set(self, state: VmState, reason: str = "", *, strict: bool = False,
             **changes: object) -> None:
        """Move to ``state``; InvalidTransition (logged) if the state machine lacks it.
        ``on_change`` records it (or queues it to be recorded; see ``_step_recorded``).
        ``strict``: if ``on_change`` fails at once, nothing changes and its error is
        raised."""
        if not can_move(self.state, state):
            log.error("VM %s: refused the move from %s to %s (%s): the state machine has "
                      "no such move", self.record.name, self.state.value, state.value, reason)
            raise InvalidTransition(
                f"VM '{self.record.name}' cannot move from {self.state.value} to "
                f"{state.value}", vm=self.record.name, state=self.state.value, to=state.value)
        if state in (VmState.OFF, VmState.SAVED):
            changes.setdefault("pid", None)
            shutil.rmtree(self.files.run_dir, ignore_errors=True)  # its sockets are dead
        if state is VmState.OFF:
            changes.setdefault("started_at", None)
        before = self.record
        self.record = self.record.evolve(state=state, state_reason=reason, **changes)
        try:
            self._on_change(self.record)
        except HvError as exc:
            if strict:
                self.record = before
                with contextlib.suppress(HvError):
                    self._on_change(before)  # tells followers it went back
                raise
            log.error("VM %s is %s, but the store cannot record it: %s",
                      self.record.name, state.value, exc)

    async def _real_state(self) -> VmState:
        """The state the VM is really in, asked from QEMU; Off without a live worker."""
        machine = self._machine
        if machine is None:
            return VmState.OFF
        try:
            status = await asyncio.wait_for(machine.status(), STATUS_TIMEOUT)
        except (HvError, TimeoutError):
            try:
                await asyncio.wait_for(asyncio.shield(machine.wait_exit()), EXIT_GRACE)
            except TimeoutError:
                return VmState.RUNNING  # alive but not answering; turn off still works
            return VmState.OFF
        return VmState.RUNNING if status == "running" else VmState.PAUSED

    async def _recover(self, operation: str, exc: BaseException, *,
                       resume: bool = False) -> None:
        """After ``operation`` failed: resume the guest if asked (it was running before
        the operation paused it), then set the state QEMU reports."""
        if resume and self._machine is not None:
            with contextlib.suppress(HvError):
                await self._machine.resume()
        state = await self._real_state()
        if state is VmState.OFF:
            await self._drop_machine()
        why = exc.message if isinstance(exc, HvError) else "it was cancelled"
        self._set(state, f"{operation} failed: {why}")

    def _step(self, operation: Operation, reason: str = "", *, strict: bool = False,
              **changes: object) -> None:
        """Take ``operation``'s next step in the state machine's table."""
        try:
            state = next_state(operation, self.state)
        except ValueError as exc:
            log.error("VM %s: refused a step: %s", self.record.name, exc)
            raise InvalidTransition(f"VM '{self.record.name}' cannot {operation.value} from "
                                    f"{self.state.value}", vm=self.record.name) from None
        self._set(state, reason, strict=strict, **changes)

    async def _step_recorded(self, operation: Operation, reason: str = "") -> None:
        """Take ``operation``'s next step and wait until the store has it; if it cannot
        record it, nothing changes and the store's error is raised (used before an
        operation begins, so a VM never runs on without the store knowing)."""
        before = self.record
        self._step(operation, reason, strict=True)
        try:
            await self._recorded(self.record)
        except HvError:
            self.record = before
            with contextlib.suppress(HvError):
                self._on_change(before)  # tells followers it went back
            raise

    @property
    def machine_running(self) -> bool:
        """A worker process exists (Running, Paused, or in a transition)."""
        return self._machine is not None

    def require(self, operation: Operation) -> None:
        require(operation, self.state, self.record.name)

    def uptime(self) -> float:
        if self.record.started_at is None or self.state in (VmState.OFF, VmState.SAVED):
            return 0.0
        return max(0.0, time.time() - self.record.started_at)

    # -- the worker process ---------------------------------------------------

    def _on_qmp_event(self, event: QmpEvent) -> None:
        io_error = BlockIoError.of(event)
        if io_error is not None:
            self._on_io_error(io_error)
            return
        mac = nics.deleted_adapter(event)
        if mac is not None:
            self._in_background(self._adapter_left(mac), "adapter-left")
            return
        if self._busy:
            return
        name = event.name
        if name == "STOP" and self.state is VmState.RUNNING:
            self._set(VmState.PAUSED, "paused")
        elif name == "RESUME" and self.state is VmState.PAUSED:
            self._set(VmState.RUNNING)
        elif name == "SHUTDOWN":
            self._expect_exit = True

    def _on_io_error(self, error: BlockIoError) -> None:
        """QEMU reports a failed disk request; with action "stop" it is pausing the VM.

        BLOCK_IO_ERROR comes before the STOP it causes, so the VM is marked Paused here
        with a reason naming the disk; the STOP that follows finds it Paused already.
        """
        report = io_errors.report(error, self._spec_for(self.record, False))
        log.warning("VM %s: %s", self.record.name, report.reason)
        self._publish("vm.io-error", vm=self.record.name, id=self.record.id, **report.event)
        if report.pauses and not self._busy and self.state in (
            VmState.RUNNING, VmState.PAUSED
        ):
            self._set(VmState.PAUSED, report.reason)

    async def _adapter_left(self, mac: str) -> None:
        """The guest let go of adapter ``mac``. A hot remove waiting for it does the rest
        (it holds the lock meanwhile); after one that gave up waiting, the netdev it
        left goes now and the host takes the adapter out of the settings."""
        async with self.lock:
            machine = self._machine
            if machine is None:
                return
            try:
                if not await nics.finish_removal(machine.devices, mac):
                    return
                if self._on_adapter_gone is not None:
                    await self._on_adapter_gone(self, mac)
            except HvError as exc:
                log.error("VM %s: network adapter %s left late, and its removal could not "
                          "be finished: %s", self.record.name, mac, exc)

    def _adopt(self, machine: Machine) -> None:
        self._machine = machine
        self._expect_exit = False
        self._watcher = asyncio.create_task(self._watch(machine), name=f"watch-{self.record.id}")
        self.link.status = ServiceStatus.NO_CONTACT
        self._link_task = asyncio.create_task(self.link.run(), name=f"link-{self.record.id}")

    def _on_link_status(self, previous: ServiceStatus, status: ServiceStatus) -> None:
        if status is ServiceStatus.LOST_COMMUNICATION:
            log.warning("VM %s: lost communication with the guest agent", self.record.name)
        self._publish("vm.heartbeat", vm=self.record.name, id=self.record.id,
                      status=status.value, previous=previous.value)

    def _in_background(self, coro: Awaitable[object], name: str) -> None:
        async def run() -> object:
            return await coro

        task = asyncio.create_task(run(), name=f"{name}-{self.record.id}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _watch(self, machine: Machine) -> None:
        await machine.wait_exit()
        await machine.close()
        if self._machine is not machine:
            return
        self._machine = None
        if not self._busy:
            reason = "the guest shut down" if self._expect_exit else "the QEMU process exited"
            self._set(VmState.OFF, reason)

    async def _drop_machine(self) -> None:
        machine, self._machine = self._machine, None
        if self._link_task is not None:
            await _cancel(self._link_task)
            self._link_task = None
        self.link.status = ServiceStatus.NO_CONTACT
        await self.agent.close()
        if self._watcher is not None:
            await _cancel(self._watcher)
            self._watcher = None
        if machine is not None:
            await machine.close()

    def running_machine(self) -> Machine:
        """The worker process; HypervisorError if the VM has none."""
        if self._machine is None:
            raise HypervisorError(f"VM '{self.record.name}' has no worker process")
        return self._machine

    # -- operations (callers hold self.lock) ----------------------------------

    async def start(self, progress: Progress) -> None:
        self.require(Operation.START)
        resume_saved = self.state is VmState.SAVED
        if resume_saved and not self.files.saved_state.exists():
            self._set(VmState.OFF, "the saved state file was missing")
            resume_saved = False
        await self._before_start(self.record)
        previous = self.state
        self._busy = True
        try:
            await self._step_recorded(Operation.START,
                                      "restoring saved state" if resume_saved else "")
        except NoSpace as exc:
            self._busy = False
            raise NoSpace(f"cannot start VM '{self.record.name}': {exc.message}",
                          **exc.data) from exc
        except BaseException:
            self._busy = False
            raise
        try:
            progress(5, "launching the VM worker process")
            self.files.run_dir.mkdir(parents=True, exist_ok=True)
            spec = self._spec_for(self.record, resume_saved)
            if resume_saved:
                spec = nics.with_saved_layout(spec, self.files.saved_layout)
            machine = await self._driver.launch(spec, self.files.pidfile, self._on_qmp_event)
            self._adopt(machine)
            if resume_saved:
                progress(20, "restoring memory state")
                await machine.restore_state(
                    self.files.saved_state, scaled(progress, 20, 95, "restoring")
                )
                await machine.resume()
                self.files.saved_state.unlink(missing_ok=True)
                self.files.saved_layout.unlink(missing_ok=True)
                # The guest's clock stood still while it was saved.
                self._in_background(self.link.sync_time(), "time-sync")
        except BaseException as exc:
            await self._abort_start(previous, exc)
            raise
        finally:
            self._busy = False
        self._step(Operation.START, pid=machine.pid, started_at=self.record.started_at
                  if resume_saved and self.record.started_at else time.time())
        progress(100, "running")

    async def _abort_start(self, previous: VmState, exc: BaseException) -> None:
        machine = self._machine
        if machine is not None:
            with contextlib.suppress(HvError):
                await machine.quit()
        await self._drop_machine()
        reason = exc.message if isinstance(exc, HvError) else "start was cancelled"
        self._set(previous, f"start failed: {reason}")

    async def turn_off(self, reason: str = "turned off") -> None:
        self.require(Operation.TURN_OFF)
        machine = self.running_machine()
        self._busy = True
        try:
            await machine.quit()
            await self._drop_machine()
        except BaseException as exc:
            await self._recover("turn off", exc)
            raise
        finally:
            self._busy = False
        self._step(Operation.TURN_OFF, reason)

    async def shut_down(self, timeout: float, progress: Progress) -> str:
        """Press the power button; turn the VM off if the guest is not off by ``timeout``.

        Returns how it ended: "guest shut down" or "turned off after N s".
        """
        self.require(Operation.SHUT_DOWN)
        machine = self.running_machine()
        if self.state is VmState.PAUSED:
            await machine.resume()
        self._busy = True
        try:
            path = await self._ask_guest_to_shut_down(machine, progress)
            try:
                await asyncio.wait_for(asyncio.shield(machine.wait_exit()), timeout)
                how = f"the guest shut down ({path})"
            except TimeoutError:
                progress(90, "the guest did not shut down in time: turning it off")
                await machine.quit()
                how = f"turned off: the guest did not shut down within {timeout:g} s"
            await self._drop_machine()
        except BaseException as exc:
            await self._recover("shut down", exc)
            raise
        finally:
            self._busy = False
        self._step(Operation.SHUT_DOWN, how)
        return how

    async def _ask_guest_to_shut_down(self, machine: Machine, progress: Progress) -> str:
        """The first steps of :func:`~hvstack.compute.policy.shutdown_chain` (the caller
        takes the last: turning off after the timeout)."""
        chain = shutdown_chain(self.record.config.integration_services.shutdown,
                               self.link.status is ServiceStatus.OK)
        if chain[0] is ShutdownStep.AGENT:
            self._step(Operation.SHUT_DOWN, "shutting down (guest agent)")
            progress(10, "asking the guest agent to shut down")
            try:
                await self.agent.call("guest-shutdown", {"mode": "powerdown"},
                                      expect_reply=False, timeout=5)
                return "guest agent"
            except HvError as exc:
                log.info("VM %s: shutdown through the agent failed (%s); using ACPI",
                         self.record.name, exc)
        acpi = "shutting down (ACPI power button)"
        if self.state is VmState.STOPPING:
            self._set(VmState.STOPPING, acpi)  # the agent failed: same step, new reason
        else:
            self._step(Operation.SHUT_DOWN, acpi)
        progress(10, "pressing the ACPI power button")
        await machine.power_button()
        return "ACPI power button"

    async def pause(self) -> None:
        self.require(Operation.PAUSE)
        self._busy = True
        try:
            await self.running_machine().pause()
        except BaseException as exc:
            await self._recover("pause", exc)
            raise
        finally:
            self._busy = False
        self._step(Operation.PAUSE, "paused")

    async def resume(self) -> None:
        self.require(Operation.RESUME)
        self._busy = True
        try:
            await self.running_machine().resume()
        except BaseException as exc:
            await self._recover("resume", exc)
            raise
        finally:
            self._busy = False
        self._step(Operation.RESUME)
        self._in_background(self.link.sync_time(), "time-sync")

    async def save(self, progress: Progress) -> None:
        self.require(Operation.SAVE)
        machine = self.running_machine()
        was = self.state
        target = self.files.saved_state
        self._busy = True
        try:
            await self._step_recorded(Operation.SAVE)
        except NoSpace as exc:
            self._busy = False
            raise NoSpace(f"cannot save VM '{self.record.name}': {exc.message}; the VM "
                          f"keeps running", **exc.data) from exc
        except BaseException:
            self._busy = False
            raise
        try:
            target.unlink(missing_ok=True)
            if was is VmState.RUNNING:
                await machine.pause()
            await nics.save_layout(machine.devices, self.record.config, self.files.saved_layout)
            await machine.save_state(target, scaled(progress, 0, 95, "saving memory"))
            await machine.quit()
            await self._drop_machine()
        except BaseException as exc:
            target.unlink(missing_ok=True)
            await self._recover("save", exc, resume=was is VmState.RUNNING)
            if isinstance(exc, InsufficientResources) or io_errors.no_space(exc):
                raise NoSpace(
                    f"cannot save VM '{self.record.name}': no space left for its memory "
                    f"state in the file system of its folder; it is "
                    f"{self.state.value} again", vm=self.record.name,
                ) from exc
            raise
        finally:
            self._busy = False
        self._step(Operation.SAVE, "saved")
        progress(100, "saved")

    @contextlib.asynccontextmanager
    async def held_still(self, operation: Operation) -> AsyncIterator[Machine]:
        """The guest stopped for the body (a standard checkpoint: its disks and memory
        taken at one instant) while the VM stays Running or Paused: the QMP STOP and
        RESUME this causes do not move its state. Afterwards a running guest runs
        again and a paused one stays paused. A failure to resume sets the state QEMU
        reports. The caller holds the lock."""
        self.require(operation)
        machine = self.running_machine()
        was_running = self.state is VmState.RUNNING
        self._busy = True
        self._memory_saved = False
        try:
            if was_running:
                await machine.pause()
            yield machine
        except BaseException as exc:
            with contextlib.suppress(HvError):
                await self._continue(machine, was_running)
            await self._recover(operation.value, exc)
            self._busy = False
            raise
        try:
            await self._continue(machine, was_running)
        except BaseException as exc:
            await self._recover(operation.value, exc)
            raise
        finally:
            self._busy = False

    async def _continue(self, machine: Machine, was_running: bool) -> None:
        if was_running:
            await machine.resume()
        elif self._memory_saved:
            # A finished save leaves QEMU "postmigrate" with its disks let go of; only
            # "cont" takes them back (QEMU 7.2 has no blockdev-set-active), so a paused
            # guest runs for a moment before it is paused again.
            await machine.resume()
            await machine.pause()
        self._memory_saved = False

    async def save_memory(self, path: Path, layout: Path, progress: Progress) -> None:
        """Save the memory and device state to ``path`` (and the adapters' layout to
        ``layout``) and go on: only inside :meth:`held_still`. Nothing is left at
        ``path`` when it fails."""
        if not self._busy:
            raise HypervisorError(f"VM '{self.record.name}' must be held still to save its "
                                  "memory and go on")
        machine = self.running_machine()
        try:
            await nics.save_layout(machine.devices, self.record.config, layout)
            self._memory_saved = True  # also after a failed migration: "cont" is safe
            await machine.save_state(path, progress)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            layout.unlink(missing_ok=True)
            if isinstance(exc, InsufficientResources) or io_errors.no_space(exc):
                raise NoSpace(f"no space left for the memory state of VM "
                              f"'{self.record.name}' in {path.parent}",
                              vm=self.record.name) from exc
            raise

    def restored_checkpoint(self, saved: bool, reason: str) -> None:
        """An Off VM got a checkpoint's state: Saved (its memory state is in place as
        the saved state) or Off. The caller holds the lock."""
        if self.state is not VmState.OFF:
            raise InvalidTransition(f"VM '{self.record.name}' is {self.state.value}, not "
                                    "Off", vm=self.record.name)
        self._set(VmState.SAVED if saved else VmState.OFF, reason)

    async def restart(self, timeout: float, progress: Progress) -> str:
        self.require(Operation.RESTART)
        how = await self.shut_down(timeout, lambda p, m: progress(p / 2, m))
        await self.start(lambda p, m: progress(50 + p / 2, m))
        return how

    async def discard_saved_state(self) -> None:
        """Turn a Saved VM Off without starting it (Hyper-V's Remove-VMSavedState)."""
        self.require(Operation.DISCARD_SAVED_STATE)
        self.files.saved_state.unlink(missing_ok=True)
        self.files.saved_layout.unlink(missing_ok=True)
        self._step(Operation.DISCARD_SAVED_STATE, "saved state discarded")

    # -- after a restart of the host service ----------------------------------

    async def reattach(self) -> None:
        """Find this VM's worker again after the host service restarted.

        The pidfile counts as much as the stored pid: the service may have died between
        launching QEMU and recording it. A live worker wins over any stored state.
        """
        record = self.record
        pid = record.pid or process.read_pid(self.files.pidfile)
        machine = None
        if pid is not None:
            try:
                machine = await self._driver.attach(
                    record.id, pid, str(self.files.qmp_socket), self._on_qmp_event
                )
            except HvError as exc:
                log.warning("cannot reattach to VM %s: %s", record.name, exc)
        if machine is None:
            if record.state is VmState.SAVED and self.files.saved_state.exists():
                return
            if record.state is VmState.SAVED:
                self._set(VmState.OFF, "the saved state file is missing")
            elif record.state is not VmState.OFF:
                self.files.saved_state.unlink(missing_ok=True)
                self._set(VmState.OFF, "the QEMU process exited while the host service was down")
            return
        self._adopt(machine)
        self.files.saved_state.unlink(missing_ok=True)
        status = await machine.status()
        if status == "running":
            self._set(VmState.RUNNING, "reattached", pid=machine.pid,
                      started_at=record.started_at or time.time())
        else:
            self._set(VmState.PAUSED, f"reattached (QEMU is {status})", pid=machine.pid,
                      started_at=record.started_at or time.time())

    async def detach(self) -> None:
        """Let go of the worker process without stopping it (host service shutdown)."""
        await self._drop_machine()


async def _nothing() -> None:
    return None


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended (again if a cancel got lost)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1)
