"""The backup integration service: freezing a guest's file systems, and always thawing.

Contract:

* ``async with freezer.frozen(vm)`` freezes the guest's file systems
  (``guest-fsfreeze-freeze``) and thaws them (``guest-fsfreeze-thaw``) when the body
  ends, also when it raises or is cancelled. Holds nest: the guest is frozen on the
  first and thawed on the last, so a checkpoint inside an API freeze does not thaw early.
  The thaw runs in a task the freezer owns: a second cancellation cannot stop it.
* :meth:`Freezer.freeze` / :meth:`Freezer.thaw` / :meth:`Freezer.status` serve the API.
  An API freeze is one hold that ends by itself after ``hold_seconds`` (a client that
  froze a guest and vanished must not leave it frozen); a second API freeze extends it.
  An API thaw ends the API hold, or, when nothing here holds the guest, thaws it anyway
  (a freeze left by someone else or an earlier service).
* While the guest is frozen by this service, a marker file ``fsfrozen`` is in the VM's
  folder. :func:`thaw_leftovers` (at service start) and :meth:`Freezer.on_contact`
  (when the agent answers again) thaw guests whose marker outlived the service that
  froze them; the marker goes once a thaw succeeded or the VM is Off.
* All of it requires the VM's backup integration service (ServiceDisabled otherwise).

qemu-ga blocks most commands while frozen (guest-exec, guest-file-*): callers check
:meth:`Freezer.check_not_frozen` first for a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmState
from hvstack.compute.states import Operation
from hvstack.errors import Conflict, HvError, ServiceDisabled

log = logging.getLogger(__name__)

MARKER = "fsfrozen"
THAW_TIMEOUT = 10.0
THAW_RETRIES = 6  # a thaw that fails is tried again, a thaw timeout apart


@dataclass(frozen=True)
class FreezeStatus:
    status: str  # "frozen" or "thawed", as the guest agent reports it
    filesystems: int | None  # how many were frozen / thawed by this request
    holds: int  # freezes this service holds (API hold included)
    auto_thaw_at: float | None  # when the API hold ends by itself (wall clock)


@dataclass
class _State:
    vm: VmController
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holds: int = 0
    frozen_count: int = 0
    api_hold: bool = False
    auto_thaw: asyncio.Task[None] | None = None
    auto_thaw_at: float | None = None


def _write_marker(vm: VmController) -> None:
    with contextlib.suppress(OSError):
        (vm.files.folder / MARKER).write_text(
            json.dumps({"since": time.time(), "service_pid": os.getpid()}) + "\n")


def _remove_marker(vm: VmController) -> None:
    (vm.files.folder / MARKER).unlink(missing_ok=True)


def has_marker(vm: VmController) -> bool:
    return (vm.files.folder / MARKER).exists()


async def _thaw_call(vm: VmController, timeout: float) -> int:
    count = await vm.agent.call("guest-fsfreeze-thaw", timeout=timeout)
    _remove_marker(vm)
    return int(count)


async def thaw_leftover(vm: VmController, timeout: float = THAW_TIMEOUT) -> bool:
    """Thaw ``vm`` if a marker says a host service froze it; True if it was thawed.

    A VM that is Off cannot be frozen: its marker is just removed. A Saved VM keeps its
    marker (its memory was saved frozen); it is thawed once it runs and answers.
    """
    if not has_marker(vm):
        return False
    if vm.state is VmState.OFF:
        _remove_marker(vm)
        return False
    if vm.state is not VmState.RUNNING:
        return False
    count = await _thaw_call(vm, timeout)
    log.warning("VM %s: thawed %d file system(s) left frozen by an earlier host service",
                vm.record.name, count)
    return True


async def thaw_leftovers(vms: Iterable[VmController], timeout: float = THAW_TIMEOUT
                         ) -> list[str]:
    """At service start: thaw each of ``vms`` a crashed service left frozen; return their
    names.
    VMs whose agent does not answer yet keep their marker (see :meth:`Freezer.on_contact`).
    """
    thawed: list[str] = []

    async def one(vm: VmController) -> None:
        try:
            if await thaw_leftover(vm, timeout):
                thawed.append(vm.record.name)
        except HvError as exc:
            log.error("VM %s may still be frozen (its agent: %s); it is thawed when the "
                      "agent answers", vm.record.name, exc)

    await asyncio.gather(*(one(vm) for vm in vms))
    return thawed


class Freezer:
    def __init__(self, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 after_thaw: Callable[[VmController], Coroutine[Any, Any, Any]] | None = None,
                 *, freeze_timeout: float = 60.0, thaw_timeout: float = THAW_TIMEOUT) -> None:
        self._spawn = spawn
        self._freeze_timeout = freeze_timeout
        self._thaw_timeout = thaw_timeout
        self._after_thaw = after_thaw
        self._states: dict[str, _State] = {}

    def _state(self, vm: VmController) -> _State:
        state = self._states.get(vm.record.id)
        if state is None:
            state = self._states[vm.record.id] = _State(vm)
        state.vm = vm
        return state

    @staticmethod
    def _require(vm: VmController, operation: Operation) -> None:
        if not vm.record.config.integration_services.backup:
            raise ServiceDisabled(vm.record.name, "backup")
        vm.require(operation)

    def holds(self, vm: VmController) -> int:
        state = self._states.get(vm.record.id)
        return state.holds if state else 0

    def check_not_frozen(self, vm: VmController, operation: Operation) -> None:
        if self.holds(vm):
            raise Conflict(
                f"cannot {operation} VM '{vm.record.name}': its file systems are frozen "
                "for a backup; thaw them first (POST .../fsfreeze {\"action\": \"thaw\"})",
                vm=vm.record.name,
            )

    # -- holds -------------------------------------------------------------------------

    async def _hold(self, vm: VmController) -> int:
        state = self._state(vm)
        async with state.lock:
            if state.holds == 0:
                _write_marker(vm)
                try:
                    count = await vm.agent.call("guest-fsfreeze-freeze",
                                                timeout=self._freeze_timeout)
                except BaseException:
                    # It may have frozen anyway (a late answer): thaw to be sure.
                    self._spawn(self._thaw_unless_held(vm))
                    raise
                state.frozen_count = int(count)
            state.holds += 1
            return state.frozen_count

    async def _release(self, vm: VmController) -> int | None:
        state = self._state(vm)
        async with state.lock:
            state.holds = max(0, state.holds - 1)
            if state.holds:
                return None
            return await self._thaw_with_retries(vm)

    async def _thaw_unless_held(self, vm: VmController) -> None:
        state = self._state(vm)
        async with state.lock:
            if not state.holds:
                await self._thaw_with_retries(vm)

    async def _thaw_with_retries(self, vm: VmController) -> int | None:
        for attempt in range(THAW_RETRIES):
            try:
                count = await _thaw_call(vm, self._thaw_timeout)
            except HvError as exc:
                if vm.state is VmState.OFF:
                    _remove_marker(vm)  # nothing runs, nothing is frozen
                if vm.state is not VmState.RUNNING:
                    return None
                log.error("VM %s: thawing its file systems failed (attempt %d): %s",
                          vm.record.name, attempt + 1, exc)
                await asyncio.sleep(self._thaw_timeout)
                continue
            if self._after_thaw is not None:
                self._spawn(self._after_thaw(vm))
            return count
        log.error("VM %s may still be frozen; its marker stays for the next attempt",
                  vm.record.name)
        return None

    async def _release_shielded(self, vm: VmController) -> int | None:
        task = self._spawn(self._release(vm))
        result: int | None = await asyncio.shield(task)
        return result

    @contextlib.asynccontextmanager
    async def frozen(self, vm: VmController) -> AsyncIterator[int]:
        """Freeze ``vm``'s file systems for the body; yields how many are frozen."""
        self._require(vm, Operation.FREEZE)
        count = await self._hold(vm)
        try:
            yield count
        finally:
            await self._release_shielded(vm)

    # -- the API -------------------------------------------------------------------------

    async def status(self, vm: VmController) -> FreezeStatus:
        self._require(vm, Operation.READ_FREEZE_STATUS)
        status = str(await vm.agent.call("guest-fsfreeze-status",
                                         timeout=self._thaw_timeout))
        state = self._state(vm)
        return FreezeStatus(status, None, state.holds, state.auto_thaw_at)

    async def freeze(self, vm: VmController, hold_seconds: float) -> FreezeStatus:
        self._require(vm, Operation.FREEZE)
        state = self._state(vm)
        count = state.frozen_count
        if not state.api_hold:
            count = await self._hold(vm)
            state.api_hold = True
        if state.auto_thaw is not None:
            state.auto_thaw.cancel()
        state.auto_thaw_at = time.time() + hold_seconds
        state.auto_thaw = self._spawn(self._auto_thaw(vm, hold_seconds))
        return FreezeStatus("frozen", count, state.holds, state.auto_thaw_at)

    async def _auto_thaw(self, vm: VmController, after: float) -> None:
        await asyncio.sleep(after)
        state = self._state(vm)
        if state.api_hold:
            log.warning("VM %s: the API freeze ran out after %g s; thawing", vm.record.name,
                        after)
            state.api_hold, state.auto_thaw, state.auto_thaw_at = False, None, None
            await self._release(vm)

    async def thaw(self, vm: VmController) -> FreezeStatus:
        self._require(vm, Operation.THAW)
        state = self._state(vm)
        if state.api_hold:
            if state.auto_thaw is not None:
                state.auto_thaw.cancel()
            state.api_hold, state.auto_thaw, state.auto_thaw_at = False, None, None
            count = await self._release_shielded(vm)
        elif state.holds:
            raise Conflict(
                f"the file systems of VM '{vm.record.name}' are frozen by a running "
                "operation (a checkpoint or backup); they thaw when it ends",
                vm=vm.record.name, holds=state.holds,
            )
        else:
            count = await _thaw_call(vm, self._thaw_timeout)
        status = "frozen" if state.holds else "thawed"
        return FreezeStatus(status, count, state.holds, state.auto_thaw_at)

    async def on_contact(self, vm: VmController) -> None:
        """The agent answers again: thaw a freeze nobody here holds any more."""
        if not has_marker(vm):
            return
        state = self._state(vm)
        async with state.lock:  # not while a freeze is being taken
            if not state.holds:
                await thaw_leftover(vm, self._thaw_timeout)

    async def close(self) -> None:
        """Service shutdown: end the API holds, thawing their guests (bounded)."""
        releases = []
        for state in list(self._states.values()):
            if state.auto_thaw is not None:
                state.auto_thaw.cancel()
            if state.api_hold:
                state.api_hold, state.auto_thaw, state.auto_thaw_at = False, None, None
                log.info("VM %s: thawing at service shutdown", state.vm.record.name)
                releases.append(self._release(state.vm))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._thaw_timeout * 2):
                await asyncio.gather(*releases, return_exceptions=True)
