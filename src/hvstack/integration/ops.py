"""Guest operations of the host: commands, file copies, KVP exchange and file system
freezes in running guests, all through the guest agent (no guest network needed).

:class:`GuestOperations` is composed on the host service (which it sees as the
:class:`VmHost` protocol), like :class:`~hvstack.host.disk_ops.DiskOperations`. Its
contract:

* :meth:`GuestOperations.exec` runs one program in the guest to completion (PowerShell
  Direct's counterpart; needs no integration service, like PowerShell Direct). See
  :func:`hvstack.integration.guest_io.run` for timeouts and killing.
* ``copies`` (:class:`~hvstack.integration.copy.GuestCopies`): Copy-VMFile, both ways;
  requires the guest services integration service (off by default, as in Hyper-V).
* KVP (Hyper-V's data exchange; requires the kvp service): the host-to-guest pool is
  the VM's ``kvp_pool`` setting, written into the guest as ``<kvp_dir>/host`` (one
  ``key=value`` per line, temporary file + rename) whenever it changes and the guest
  answers, and again on every contact with the agent (:meth:`push_kvp`). The
  guest-to-host pool is ``<kvp_dir>/guest``, read when asked. Intrinsic items come from
  the agent (OS, host name, addresses, file systems).
* ``freezer`` (:class:`~hvstack.integration.freeze.Freezer`): the backup service's
  file system freeze; ``async with guest_ops.frozen(vm)`` always thaws.
* Operations need the VM Running (InvalidState otherwise) and a guest that is not
  frozen by this service (Conflict). Nothing here takes the VM's lifecycle lock: a long
  copy never holds up a stop, which simply ends the copy. Agent calls of one VM are
  serialised by its :class:`~hvstack.hypervisor.qemu.agent.GuestAgent`; other VMs never
  wait on them. Every agent call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import VmState
from hvstack.compute.states import Operation
from hvstack.errors import (
    HvError,
    InvalidInput,
    NotFound,
    ServiceDisabled,
)
from hvstack.hypervisor.qemu.agent import AgentUnavailable, GuestCommandError
from hvstack.integration import guest_io
from hvstack.integration.copy import GuestCopies, JobRunner
from hvstack.integration.freeze import Freezer, FreezeStatus, thaw_leftovers
from hvstack.integration.rules import (
    KVP_MAX_ITEMS,
    GuestPolicy,
    IntrinsicData,
    check_kvp_item,
    format_kvp,
    intrinsic_data,
    parse_kvp,
)

__all__ = ["GuestOperations", "KvpChange", "KvpListing", "thaw_leftovers"]

log = logging.getLogger(__name__)

KVP_READ_LIMIT = 4 * 1024 * 1024
KVP_WRITE_TIMEOUT = 30.0
# mkdir, write a temporary file from stdin, rename it over the pool file.
KVP_WRITE = 'mkdir -p "$1" && cat > "$1/.host.tmp" && mv -f "$1/.host.tmp" "$1/host"'
INTRINSIC_COMMANDS = ("guest-get-osinfo", "guest-get-host-name",
                      "guest-network-get-interfaces", "guest-get-fsinfo")


@dataclass(frozen=True)
class KvpChange:
    key: str
    value: str | None  # None: deleted
    pushed: bool  # written into the guest now
    push_error: str | None  # why not (it is written on the next contact)
    host: dict[str, str]  # the host-to-guest pool after the change


@dataclass(frozen=True)
class KvpListing:
    host: dict[str, str]
    guest: dict[str, str]
    intrinsic: IntrinsicData | None
    guest_available: bool  # the guest answered
    guest_error: str | None
    ignored_guest_lines: int


class VmHost(Protocol):
    """What the guest operations need of the host service
    (:class:`hvstack.host.service.HostService`)."""

    contact_hooks: list[Callable[[VmController], Awaitable[None]]]

    @property
    def jobs(self) -> JobRunner: ...

    def get_vm(self, ref: str) -> VmController: ...

    async def update_vm(self, ref: str, **changes: Any) -> VmController: ...


class GuestOperations:
    def __init__(self, service: VmHost, policy: GuestPolicy | None = None) -> None:
        self._service = service
        self.policy = policy or GuestPolicy.from_env()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._kvp_locks: dict[str, asyncio.Lock] = {}
        self.freezer = Freezer(self.spawn, after_thaw=self._push_quietly,
                               freeze_timeout=self.policy.freeze_timeout,
                               thaw_timeout=self.policy.thaw_timeout)
        self.copies = GuestCopies(self.policy, self._copy_vm, service.jobs, self.spawn)
        service.contact_hooks.append(self.on_contact)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task this object owns (cleanups that must outlive a request)."""
        task = asyncio.create_task(coro, name="guest-ops")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Service shutdown: thaw API freezes, then let cleanups finish (bounded)."""
        await self.freezer.close()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await asyncio.gather(*self._tasks, return_exceptions=True)

    async def on_contact(self, vm: VmController) -> None:
        """The guest agent answers (again): thaw a leftover freeze, push the KVP pool.
        Registered in the service's contact hooks; each step's failure is logged."""
        try:
            await self.freezer.on_contact(vm)
        except HvError as exc:
            log.error("VM %s may still be frozen: %s", vm.record.name, exc)
        await self._push_quietly(vm)

    # -- checks ----------------------------------------------------------------------

    def _running(self, ref: str, operation: Operation) -> VmController:
        vm = self._service.get_vm(ref)
        vm.require(operation)
        self.freezer.check_not_frozen(vm, operation)
        return vm

    @staticmethod
    def _require(vm: VmController, service: str) -> None:
        if not getattr(vm.record.config.integration_services, service):
            raise ServiceDisabled(vm.record.name, service)

    def _copy_vm(self, ref: str, operation: Operation) -> VmController:
        vm = self._service.get_vm(ref)
        self._require(vm, "guest_services")
        return self._running(ref, operation)

    # -- commands ----------------------------------------------------------------------

    async def exec(self, ref: str, command: Sequence[str], *, stdin: bytes | None = None,
                   timeout: float, max_output: int = guest_io.AGENT_MAX_OUTPUT
                   ) -> guest_io.ExecResult:
        if not command or not command[0]:
            raise InvalidInput("give the program to run")
        if stdin is not None and len(stdin) > self.policy.max_exec_input:
            raise InvalidInput(f"the input is {len(stdin)} bytes; commands take at most "
                               f"{self.policy.max_exec_input} (copy larger files with "
                               "copy-file)", size=len(stdin))
        vm = self._running(ref, Operation.RUN_COMMAND)
        return await guest_io.run(vm.agent, command, stdin=stdin, timeout=timeout,
                                  max_output=max_output,
                                  call_timeout=self.policy.agent_timeout, spawn=self.spawn)

    # -- KVP -------------------------------------------------------------------------

    def _kvp_lock(self, vm: VmController) -> asyncio.Lock:
        return self._kvp_locks.setdefault(vm.record.id, asyncio.Lock())

    async def _change_pool(self, ref: str, key: str, value: str | None) -> KvpChange:
        vm = self._service.get_vm(ref)
        self._require(vm, "kvp")
        check_kvp_item(key, value)
        async with self._kvp_lock(vm):
            pool = dict(vm.record.config.kvp_pool)
            if value is None:
                if key not in pool:
                    raise NotFound(f"VM '{vm.record.name}' has no KVP item '{key}'", key=key)
                del pool[key]
            else:
                if key not in pool and len(pool) >= KVP_MAX_ITEMS:
                    raise InvalidInput(f"VM '{vm.record.name}' has {KVP_MAX_ITEMS} KVP items, "
                                       "the most it may have")
                pool[key] = value
            await self._service.update_vm(vm.record.id, kvp_pool=pool)
        pushed, error = await self._try_push(vm)
        return KvpChange(key, value, pushed, error, dict(vm.record.config.kvp_pool))

    async def _try_push(self, vm: VmController) -> tuple[bool, str | None]:
        """Push now if the guest can take it; else say why not."""
        if vm.state is not VmState.RUNNING:
            return False, f"VM '{vm.record.name}' is {vm.state.value}"
        if self.freezer.holds(vm):
            return False, f"VM '{vm.record.name}' is frozen for a backup"
        try:
            return await self.push_kvp(vm), None
        except HvError as exc:
            return False, exc.message

    async def kvp_set(self, ref: str, key: str, value: str) -> KvpChange:
        return await self._change_pool(ref, key, value)

    async def kvp_delete(self, ref: str, key: str) -> KvpChange:
        return await self._change_pool(ref, key, None)

    async def push_kvp(self, vm: VmController) -> bool:
        """Write the host-to-guest pool into the guest. False when there is nothing to
        do (kvp disabled, VM not Running, guest frozen); raises HvError when the guest
        does not take it."""
        if (not vm.record.config.integration_services.kvp or vm.state is not VmState.RUNNING
                or self.freezer.holds(vm)):
            return False
        async with self._kvp_lock(vm):
            data = format_kvp(vm.record.config.kvp_pool)
            result = await guest_io.run(
                vm.agent, ["/bin/sh", "-c", KVP_WRITE, "hvstack-kvp", self.policy.kvp_dir],
                stdin=data, timeout=KVP_WRITE_TIMEOUT, call_timeout=self.policy.agent_timeout,
                spawn=self.spawn)
        if result.exit_code != 0:
            raise GuestCommandError(
                f"writing the KVP pool into VM '{vm.record.name}' failed: "
                f"{result.stderr.decode(errors='replace').strip() or result.exit_code}",
                vm=vm.record.name)
        return True

    async def _push_quietly(self, vm: VmController) -> None:
        try:
            await self.push_kvp(vm)
        except HvError as exc:
            log.info("VM %s: KVP pool not pushed: %s", vm.record.name, exc)

    async def _read_guest_pool(self, vm: VmController) -> tuple[dict[str, str], int]:
        path = f"{self.policy.kvp_dir}/guest"
        try:
            handle = await guest_io.GuestFile.open(vm.agent, path, "r",
                                                   call_timeout=self.policy.agent_timeout)
        except GuestCommandError as exc:
            if "No such file" in exc.message:
                return {}, 0
            raise
        try:
            data, _ = await handle.read(KVP_READ_LIMIT)
        finally:
            await handle.close()
        return parse_kvp(data)

    async def _intrinsic(self, vm: VmController) -> IntrinsicData:
        answers: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for command in INTRINSIC_COMMANDS:
            try:
                answers[command] = await vm.agent.call(command,
                                                       timeout=self.policy.agent_timeout)
            except GuestCommandError as exc:
                errors[command] = exc.message
        return intrinsic_data(answers, errors)

    async def kvp_list(self, ref: str) -> KvpListing:
        vm = self._service.get_vm(ref)
        self._require(vm, "kvp")
        host = dict(vm.record.config.kvp_pool)
        if vm.state is not VmState.RUNNING:
            return KvpListing(host, {}, None, False, f"VM '{vm.record.name}' is "
                              f"{vm.state.value}", 0)
        if self.freezer.holds(vm):
            return KvpListing(host, {}, None, False, f"VM '{vm.record.name}' is frozen "
                              "for a backup", 0)
        try:
            guest, ignored = await self._read_guest_pool(vm)
            intrinsic = await self._intrinsic(vm)
        except (AgentUnavailable, GuestCommandError) as exc:
            return KvpListing(host, {}, None, False, exc.message, 0)
        return KvpListing(host, guest, intrinsic, True, None, ignored)

    # -- backup ------------------------------------------------------------------------

    def frozen(self, vm: VmController) -> contextlib.AbstractAsyncContextManager[int]:
        """``async with guest_ops.frozen(vm) as count``: see
        :meth:`hvstack.integration.freeze.Freezer.frozen`."""
        return self.freezer.frozen(vm)

    async def fsfreeze(self, ref: str, action: str, hold_seconds: float = 60.0
                       ) -> FreezeStatus:
        vm = self._service.get_vm(ref)
        if action == "freeze":
            return await self.freezer.freeze(vm, hold_seconds)
        if action == "thaw":
            return await self.freezer.thaw(vm)
        if action == "status":
            return await self.freezer.status(vm)
        raise InvalidInput(f"fsfreeze action '{action}' is not one of freeze, thaw, status")
