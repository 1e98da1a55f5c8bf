"""Commands and files in a guest through its agent: ``guest-exec`` and ``guest-file-*``.

Contract:

* :func:`run` starts a program with ``guest-exec`` (output captured, optional stdin
  bytes) and polls ``guest-exec-status`` until the agent reports it exited. qemu-ga
  only hands out the output once the program has exited and closed its output pipes,
  so nothing streams. It returns an :class:`ExecResult`, or raises
  :class:`~hvstack.hypervisor.qemu.agent.GuestCommandError` when the agent cannot start
  the program (e.g. no such binary), :class:`ExecTimeout` when it runs past its
  deadline, :class:`~hvstack.hypervisor.qemu.agent.AgentUnavailable` when the agent does
  not answer. A program that times out, or whose caller is cancelled (even before the
  agent said its pid), is killed with its descendants (:func:`kill_tree`, itself
  bounded) before :func:`run` returns or re-raises.
* :class:`GuestFile` is one open ``guest-file-*`` handle: ``read``, ``write`` (all of
  the bytes, in as many calls as the agent needs), ``close`` (never raises).

Every agent call has a timeout (``call_timeout``). Program deadlines are the host's: the
guest's clock and tools play no part in them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from hvstack.errors import HvError, OperationTimeout
from hvstack.hypervisor.qemu.agent import GuestAgent, GuestCommandError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0  # the kill helper's own run, and then waiting for the victim to go
AGENT_MAX_OUTPUT = 16 * 1024 * 1024  # qemu-ga keeps at most this much of each stream
# Polls of guest-exec-status: quick at first (most commands are short), then steady.
POLL_STEPS = (0.0, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1)
POLL_STEADY = 0.2

# Kill a process and all its descendants. Each one is stopped before its children are
# looked up (so none forks meanwhile), then all are killed at once. Parents come from
# /proc/PID/status, which every Linux guest has (busybox has no pgrep -P).
KILL_TREE = r"""
collect() {
    local s k v p
    kill -STOP "$1" 2>/dev/null || return 0
    echo "$1"
    for s in /proc/[0-9]*/status; do
        while read -r k v; do
            if [ "$k" = PPid: ]; then
                if [ "$v" = "$1" ]; then p=${s#/proc/}; collect "${p%/status}"; fi
                break
            fi
        done < "$s"
    done 2>/dev/null
}
victims=$(collect "$1")
[ -n "$victims" ] && kill -KILL $victims 2>/dev/null
exit 0
"""

_AGENT_FAILURE = re.compile(r"error was '(.*)'$")

Spawn = Callable[[Coroutine[Any, Any, Any]], object]


@dataclass(frozen=True)
class ExecResult:
    pid: int
    exit_code: int | None  # None when a signal ended the program
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    seconds: float

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


class ExecTimeout(OperationTimeout):
    """A guest program ran past its deadline (and was killed)."""


def _status_result(pid: int, status: dict[str, Any], max_output: int,
                   began: float) -> ExecResult:
    out = base64.b64decode(status.get("out-data") or "")
    err = base64.b64decode(status.get("err-data") or "")
    return ExecResult(
        pid=pid,
        exit_code=status.get("exitcode") if "signal" not in status else None,
        signal=status.get("signal"),
        stdout=out[:max_output],
        stderr=err[:max_output],
        stdout_truncated=bool(status.get("out-truncated")) or len(out) > max_output,
        stderr_truncated=bool(status.get("err-truncated")) or len(err) > max_output,
        seconds=time.monotonic() - began,
    )


async def start(agent: GuestAgent, argv: Sequence[str], *, stdin: bytes | None = None,
                call_timeout: float = CALL_TIMEOUT) -> int:
    """Start ``argv`` in the guest; return its pid."""
    arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]),
                                 "capture-output": True}
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin).decode()
    try:
        started = await agent.call("guest-exec", arguments, timeout=call_timeout)
    except GuestCommandError as exc:
        reason = exc.message.split(": ", 1)[-1]
        if inner := _AGENT_FAILURE.search(reason):
            reason = inner.group(1)
        raise GuestCommandError(
            f"cannot run '{argv[0]}' in VM '{agent.vm_name}': {reason}",
            vm=agent.vm_name, command=argv[0],
        ) from exc
    return int(started["pid"])


async def _poll(agent: GuestAgent, pid: int, call_timeout: float) -> dict[str, Any] | None:
    status: dict[str, Any] = await agent.call("guest-exec-status", {"pid": pid},
                                              timeout=call_timeout)
    return status if status.get("exited") else None


async def wait(agent: GuestAgent, pid: int, deadline: float, *,
               call_timeout: float = CALL_TIMEOUT) -> dict[str, Any] | None:
    """Poll until the program exited (its final status) or ``deadline`` (None)."""
    step = 0
    while True:
        status = await _poll(agent, pid, call_timeout)
        if status is not None:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        pause = POLL_STEPS[step] if step < len(POLL_STEPS) else POLL_STEADY
        step += 1
        await asyncio.sleep(min(pause, left))


async def kill_tree(agent: GuestAgent, pid: int, *, call_timeout: float = CALL_TIMEOUT
                    ) -> dict[str, Any] | None:
    """Kill ``pid`` and its descendants; return its final status if it could be reaped."""
    deadline = time.monotonic() + KILL_TIMEOUT
    try:
        helper = await start(agent, ["/bin/sh", "-c", KILL_TREE, "hvstack-kill", str(pid)],
                             call_timeout=call_timeout)
        await wait(agent, helper, deadline, call_timeout=call_timeout)
        return await wait(agent, pid, deadline, call_timeout=call_timeout)
    except HvError as exc:
        log.warning("VM %s: could not kill guest process %d: %s", agent.vm_name, pid, exc)
        return None


async def _kill_once_started(agent: GuestAgent, starting: asyncio.Future[int],
                             call_timeout: float) -> dict[str, Any] | None:
    """Kill the program ``starting`` starts, once its pid is known (if it started)."""
    try:
        pid = await starting
    except HvError:
        return None  # it never started
    return await kill_tree(agent, pid, call_timeout=call_timeout)


async def run(agent: GuestAgent, argv: Sequence[str], *, stdin: bytes | None = None,
              timeout: float, max_output: int = AGENT_MAX_OUTPUT,
              call_timeout: float = CALL_TIMEOUT, spawn: Spawn | None = None) -> ExecResult:
    """Run ``argv`` in the guest to completion (see the module docstring).

    ``spawn`` takes over killing the program when the caller is cancelled (a task owned
    by someone who outlives this call); without it the kill runs shielded here.
    """
    began = time.monotonic()
    # Shielded: a caller cancelled after the guest started the program but before its
    # pid arrived would otherwise leave the program running with nobody to kill it.
    starting = asyncio.ensure_future(start(agent, argv, stdin=stdin,
                                           call_timeout=call_timeout))
    try:
        pid = await asyncio.shield(starting)
        status = await wait(agent, pid, began + timeout, call_timeout=call_timeout)
    except asyncio.CancelledError:
        killing = _kill_once_started(agent, starting, call_timeout)
        if spawn is not None:
            spawn(killing)
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(killing)
        raise
    if status is not None:
        return _status_result(pid, status, max_output, began)
    final = await kill_tree(agent, pid, call_timeout=call_timeout)
    partial = _status_result(pid, final or {}, 64 * 1024, began)
    raise ExecTimeout(
        f"'{' '.join(argv)[:200]}' did not finish within {timeout:g} s in VM "
        f"'{agent.vm_name}'; it was killed" + ("" if final else " (not confirmed)"),
        vm=agent.vm_name, command=argv[0], pid=pid, timeout_seconds=timeout,
        killed=final is not None,
        stdout=partial.stdout.decode(errors="replace"),
        stderr=partial.stderr.decode(errors="replace"),
    )


class GuestFile:
    """One open file in the guest (``guest-file-open``'s handle)."""

    def __init__(self, agent: GuestAgent, handle: int, path: str, call_timeout: float) -> None:
        self.agent = agent
        self.handle = handle
        self.path = path
        self.call_timeout = call_timeout
        self.closed = False

    @classmethod
    async def open(cls, agent: GuestAgent, path: str, mode: str, *,
                   call_timeout: float = CALL_TIMEOUT) -> GuestFile:
        handle = await agent.call("guest-file-open", {"path": path, "mode": mode},
                                  timeout=call_timeout)
        return cls(agent, int(handle), path, call_timeout)

    async def read(self, count: int) -> tuple[bytes, bool]:
        """Up to ``count`` bytes, and whether the end of the file was reached."""
        reply = await self.agent.call("guest-file-read", {"handle": self.handle,
                                                          "count": count},
                                      timeout=self.call_timeout)
        return base64.b64decode(reply.get("buf-b64") or ""), bool(reply.get("eof"))

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            reply = await self.agent.call(
                "guest-file-write",
                {"handle": self.handle, "buf-b64": base64.b64encode(view).decode()},
                timeout=self.call_timeout,
            )
            count = int(reply.get("count", 0))
            if count <= 0:
                raise GuestCommandError(
                    f"writing {self.path} in VM '{self.agent.vm_name}' made no progress",
                    vm=self.agent.vm_name, command="guest-file-write",
                )
            view = view[count:]

    async def close(self) -> None:
        """Close the handle; errors are logged, not raised (this runs in cleanups)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.agent.call("guest-file-close", {"handle": self.handle},
                                  timeout=self.call_timeout)
        except HvError as exc:
            log.info("VM %s: closing %s: %s", self.agent.vm_name, self.path, exc)
