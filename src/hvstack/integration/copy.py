"""Copying files between a client and a guest (Hyper-V's Copy-VMFile), as jobs.

The bytes come from, and go to, the client over the API: the host file is on the
client's machine (read and written with the client user's rights), never a path the
service opens. A copy is two requests:

1. :meth:`GuestCopies.start_upload` / :meth:`GuestCopies.start_download` check
   everything that can be checked first (guest services enabled, VM Running, the guest
   path's rules, the size limit, in the guest: the folder, an existing file, free
   space; for a download the guest file's size and sha256) and start a job
   (``copy-to-guest`` / ``copy-from-guest``) that waits up to ``data_wait`` seconds for:
2. the data connection: :meth:`GuestCopies.feed` streams the request body into the
   guest (and returns the finished job), :meth:`GuestCopies.stream` yields the guest
   file's bytes for the response body.

Guarantees:

* Uploads go to ``.NAME.hvtmp-RANDOM`` beside the destination in
  :attr:`GuestPolicy.write_chunk` pieces (guest-file-write); then ``sha256sum`` in the
  guest must equal the sha256 of the bytes received (and the client's, if it sent
  one), and only then is the file renamed over its destination. Any failure,
  cancellation or client disconnect removes the temporary file: the destination is
  either untouched or complete. Folders made by ``create_dirs`` stay.
* Downloads read :attr:`GuestPolicy.read_chunk` pieces (guest-file-read); the sha256 is
  taken in the guest before reading, and the last piece is held back until the bytes
  read match it, so a file that changed while it was copied ends the response early
  (the client sees an incomplete body) instead of completing it.
* Job progress follows the bytes written into / read from the guest. Every agent call
  and every wait on the client is bounded (see :class:`GuestPolicy`).

These need a POSIX shell and sha256sum, stat, readlink, df in the guest (busybox has
them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import posixpath
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from hvstack.compute.lifecycle import VmController
from hvstack.compute.states import Operation
from hvstack.errors import (
    AlreadyExists,
    Cancelled,
    Conflict,
    HvError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    OperationTimeout,
)
from hvstack.hypervisor.qemu.agent import GuestCommandError
from hvstack.integration import guest_io
from hvstack.integration.rules import (
    GuestPathNotAllowed,
    GuestPolicy,
    check_size,
    guest_file_path,
    is_denied,
)
from hvstack.progress import Progress

log = logging.getLogger(__name__)

UPLOAD_CHECK = r"""
dst=$1 create=$2 overwrite=$3
dir=${dst%/*}
[ -n "$dir" ] || dir=/
if [ ! -d "$dir" ]; then
    if [ -e "$dir" ]; then echo error=notdir; exit 0; fi
    if [ "$create" != 1 ]; then echo error=nodir; exit 0; fi
    mkdir -p "$dir" || { echo error=mkdir; exit 0; }
fi
echo "dir=$(readlink -f "$dir")"
if [ -d "$dst" ]; then echo error=isdir; exit 0; fi
if [ -e "$dst" ] || [ -L "$dst" ]; then
    [ "$overwrite" = 1 ] || { echo error=exists; exit 0; }
    echo "mode=$(stat -L -c %a "$dst" 2>/dev/null)"
fi
echo "free=$(df -Pk "$dir" 2>/dev/null | awk 'NR==2 {print $4}')"
"""

UPLOAD_FINISH = r"""
tmp=$1 dst=$2 want=$3 mode=$4 overwrite=$5
fail() { rm -f "$tmp"; echo "$2" >&2; exit "$1"; }
got=$(sha256sum "$tmp") || fail 20 "sha256sum failed"
got=${got%% *}
[ "$got" = "$want" ] || fail 21 "the file in the guest has sha256 $got"
chmod "$mode" "$tmp" || fail 22 "chmod $mode failed"
[ -d "$dst" ] && fail 23 "$dst is a folder"
if [ "$overwrite" != 1 ] && { [ -e "$dst" ] || [ -L "$dst" ]; }; then
    fail 24 "$dst exists"
fi
mv -f "$tmp" "$dst" || fail 25 "renaming to $dst failed"
echo "$got"
"""

DOWNLOAD_CHECK = r"""
src=$1
[ -e "$src" ] || { echo error=missing; exit 0; }
[ -d "$src" ] && { echo error=isdir; exit 0; }
[ -f "$src" ] || { echo error=notfile; exit 0; }
echo "real=$(readlink -f "$src")"
echo "size=$(stat -L -c %s "$src")"
"""

CHECK_TIMEOUT = 30.0


class CopyJob(Protocol):
    """What a copy needs of the job that runs it (:class:`hvstack.host.jobs.Job`)."""

    @property
    def id(self) -> str: ...

    @property
    def done(self) -> asyncio.Event: ...

    @property
    def error(self) -> HvError | None: ...

    @property
    def task(self) -> asyncio.Task[None] | None: ...


class JobRunner(Protocol):
    """Starts and cancels jobs (:class:`hvstack.host.jobs.JobManager`)."""

    def start(self, kind: str, target: str,
              body: Callable[[Progress], Awaitable[dict[str, Any] | None]]) -> CopyJob: ...

    def cancel(self, job_id: str) -> object: ...


@dataclass
class Transfer:
    """One copy between a client and a guest: its job and its data connection."""

    id: str  # its job's id
    vm_id: str
    vm_name: str
    direction: str  # "to-guest" or "from-guest"
    guest_path: str
    size: int
    sha256: str | None
    job: CopyJob | None = None
    data: asyncio.Future[AsyncIterator[bytes]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    queue: asyncio.Queue[bytes | HvError | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=2))


class GuestCopies:
    """The copies of one host service; a transfer lives as long as its job."""

    def __init__(self, policy: GuestPolicy, vm_for: Callable[[str, Operation], VmController],
                 jobs: JobRunner,
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self.policy = policy
        self._vm_for = vm_for  # (ref, operation) -> a Running VM with guest services
        self._jobs = jobs
        self._spawn = spawn
        self._transfers: dict[str, Transfer] = {}

    # -- guest scripts ------------------------------------------------------------------

    async def _script(self, vm: VmController, script: str, name: str, *args: str,
                      timeout: float = CHECK_TIMEOUT) -> guest_io.ExecResult:
        return await guest_io.run(vm.agent, ["/bin/sh", "-c", script, name, *args],
                                  timeout=timeout, call_timeout=self.policy.agent_timeout,
                                  spawn=self._spawn)

    async def _facts(self, vm: VmController, script: str, *args: str) -> dict[str, str]:
        result = await self._script(vm, script, "hvstack-copy-check", *args)
        if result.exit_code != 0:
            raise GuestCommandError(
                f"checking {args[0]} in VM '{vm.record.name}' failed: "
                f"{result.stderr.decode(errors='replace').strip() or result.exit_code}",
                vm=vm.record.name, path=args[0])
        facts = {}
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            facts[key] = value
        return facts

    def _check_real(self, vm: VmController, path: str, real: str) -> None:
        if real and is_denied(real, self.policy.deny):
            raise GuestPathNotAllowed(
                f"'{path}' in VM '{vm.record.name}' leads to {real}, a folder the host "
                f"does not allow ({', '.join(self.policy.deny)})", path=path, real=real)

    # -- uploads ------------------------------------------------------------------------

    async def start_upload(self, ref: str, guest_path: str, size: int, sha256: str | None,
                           *, create_dirs: bool, overwrite: bool) -> Transfer:
        vm = self._vm_for(ref, Operation.COPY_FILES)
        path = guest_file_path(guest_path, self.policy, what="destination")
        check_size(size, self.policy, path)
        facts = await self._facts(vm, UPLOAD_CHECK, path, str(int(create_dirs)),
                                  str(int(overwrite)))
        folder = posixpath.dirname(path)
        error = facts.get("error")
        if error == "nodir":
            raise NotFound(f"folder {folder} does not exist in VM '{vm.record.name}'; "
                           "--create-dirs makes it", path=folder)
        if error == "notdir":
            raise InvalidInput(f"{folder} in VM '{vm.record.name}' is not a folder",
                               path=folder)
        if error == "mkdir":
            raise GuestCommandError(f"cannot make folder {folder} in VM '{vm.record.name}'",
                                    vm=vm.record.name, path=folder)
        if error == "isdir":
            raise InvalidInput(f"{path} in VM '{vm.record.name}' is a folder; give the "
                               "file's full path", path=path)
        if error == "exists":
            raise AlreadyExists(f"{path} exists in VM '{vm.record.name}'; --overwrite "
                                "replaces it", path=path)
        self._check_real(vm, folder, facts.get("dir", ""))
        free = facts.get("free", "")
        if free.isdigit() and int(free) * 1024 < size:
            raise InsufficientResources(
                f"{folder} in VM '{vm.record.name}' has {int(free) * 1024} bytes free; "
                f"the file has {size}", path=folder, free=int(free) * 1024, size=size)
        mode = facts.get("mode") or "644"
        transfer = Transfer("", vm.record.id, vm.record.name, "to-guest", path, size, sha256)

        async def body(progress: Progress) -> dict[str, Any]:
            chunks = await self._data(transfer)
            return await self._write(vm, transfer, chunks, mode, overwrite, progress)

        return self._register(transfer, "copy-to-guest", body)

    def _register(self, transfer: Transfer, kind: str,
                  body: Callable[[Progress], Awaitable[Any]]) -> Transfer:
        job = transfer.job = self._jobs.start(kind, transfer.vm_name, body)
        transfer.id = job.id
        self._transfers[transfer.id] = transfer
        assert job.task is not None
        job.task.add_done_callback(lambda _: self._transfers.pop(job.id, None))
        return transfer

    async def _data(self, transfer: Transfer) -> AsyncIterator[bytes]:
        try:
            async with asyncio.timeout(self.policy.data_wait):
                return await asyncio.shield(transfer.data)
        except TimeoutError:
            raise OperationTimeout(
                f"no data connection for the copy of {transfer.guest_path} arrived within "
                f"{self.policy.data_wait:g} s", path=transfer.guest_path) from None

    async def _next(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        try:
            async with asyncio.timeout(self.policy.stall_timeout):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise OperationTimeout(f"the client sent nothing for "
                                   f"{self.policy.stall_timeout:g} s") from None

    async def _write(self, vm: VmController, t: Transfer, chunks: AsyncIterator[bytes],
                     mode: str, overwrite: bool, progress: Progress) -> dict[str, Any]:
        folder, name = posixpath.split(t.guest_path)
        tmp = posixpath.join(folder, f".{name}.hvtmp-{secrets.token_hex(4)}")
        policy = self.policy
        handle = await guest_io.GuestFile.open(vm.agent, tmp, "wb",
                                               call_timeout=policy.chunk_timeout)
        digest, written, buffer, finished = hashlib.sha256(), 0, bytearray(), False
        try:
            while True:
                piece = await self._next(chunks)
                if piece is not None:
                    if written + len(buffer) + len(piece) > t.size:
                        raise InvalidInput(f"the client sent more than the {t.size} bytes "
                                           "it announced", size=t.size)
                    buffer += piece
                while len(buffer) >= policy.write_chunk or (piece is None and buffer):
                    out = bytes(buffer[:policy.write_chunk])
                    del buffer[:policy.write_chunk]
                    await handle.write(out)
                    digest.update(out)
                    written += len(out)
                    progress(95 * written / max(t.size, 1), f"{written} of {t.size} bytes")
                if piece is None:
                    break
            if written != t.size:
                raise InvalidInput(f"the upload ended after {written} of {t.size} bytes",
                                   size=t.size, received=written)
            await handle.close()
            got = digest.hexdigest()
            if t.sha256 and got != t.sha256:
                raise InvalidInput(f"the bytes received have sha256 {got}, not the {t.sha256} "
                                   "the client announced", sha256=got)
            progress(96, "verifying in the guest (sha256sum)")
            result = await self._script(vm, UPLOAD_FINISH, "hvstack-copy-finish", tmp,
                                        t.guest_path, got, mode, str(int(overwrite)),
                                        timeout=policy.verify_timeout)
            why = result.stderr.decode(errors="replace").strip()
            if result.exit_code == 24:
                raise AlreadyExists(f"{why} in VM '{vm.record.name}' (it appeared during "
                                    "the copy)", path=t.guest_path)
            if result.exit_code != 0:
                raise GuestCommandError(f"copying to {t.guest_path} in VM '{vm.record.name}'"
                                        f" failed: {why or result.exit_code}",
                                        vm=vm.record.name, path=t.guest_path)
            finished = True  # the script removed or renamed the temporary file
        finally:
            if not finished:
                self._spawn(self._discard(vm, handle, tmp))
        return {"vm": vm.record.name, "guest_path": t.guest_path, "size": written,
                "sha256": got, "verified": "sha256sum in the guest"}

    async def _discard(self, vm: VmController, handle: guest_io.GuestFile, tmp: str) -> None:
        await handle.close()
        with contextlib.suppress(HvError):
            await guest_io.run(vm.agent, ["rm", "-f", tmp], timeout=CHECK_TIMEOUT,
                               call_timeout=self.policy.agent_timeout)

    def _transfer(self, ref_vm: VmController, transfer_id: str, direction: str) -> Transfer:
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.vm_id != ref_vm.record.id or (
                transfer.direction != direction):
            raise NotFound(f"no {direction} copy {transfer_id} is waiting for data on VM "
                           f"'{ref_vm.record.name}'", transfer=transfer_id)
        if transfer.data.done():
            raise Conflict(f"copy {transfer_id} already has its data connection",
                           transfer=transfer_id)
        return transfer

    async def feed(self, vm: VmController, transfer_id: str,
                   chunks: AsyncIterator[bytes]) -> CopyJob:
        """Stream ``chunks`` into the upload's guest file; return the job once it ended
        (raising its error if it failed)."""
        transfer = self._transfer(vm, transfer_id, "to-guest")
        transfer.data.set_result(chunks)
        job = transfer.job
        assert job is not None
        try:
            await job.done.wait()
        except asyncio.CancelledError:
            self._jobs.cancel(job.id)
            raise
        if job.error is not None:
            raise job.error
        return job

    # -- downloads ----------------------------------------------------------------------

    async def start_download(self, ref: str, guest_path: str) -> Transfer:
        vm = self._vm_for(ref, Operation.COPY_FILES)
        path = guest_file_path(guest_path, self.policy, what="source")
        facts = await self._facts(vm, DOWNLOAD_CHECK, path)
        error = facts.get("error")
        if error == "missing":
            raise NotFound(f"{path} does not exist in VM '{vm.record.name}'", path=path)
        if error in ("isdir", "notfile"):
            what = "a folder" if error == "isdir" else "not a regular file"
            raise InvalidInput(f"{path} in VM '{vm.record.name}' is {what}", path=path)
        self._check_real(vm, path, facts.get("real", ""))
        size_text = facts.get("size", "")
        if not size_text.isdigit():
            raise GuestCommandError(f"cannot tell the size of {path} in VM "
                                    f"'{vm.record.name}'", vm=vm.record.name, path=path)
        size = int(size_text)
        check_size(size, self.policy, path)
        summed = await guest_io.run(vm.agent, ["sha256sum", path],
                                    timeout=self.policy.verify_timeout,
                                    call_timeout=self.policy.agent_timeout, spawn=self._spawn)
        sha = summed.stdout.decode(errors="replace").split(" ", 1)[0].strip()
        if summed.exit_code != 0 or len(sha) != 64:
            raise GuestCommandError(f"sha256sum {path} failed in VM '{vm.record.name}': "
                                    f"{summed.stderr.decode(errors='replace').strip()}",
                                    vm=vm.record.name, path=path)
        transfer = Transfer("", vm.record.id, vm.record.name, "from-guest", path, size, sha)

        async def body(progress: Progress) -> dict[str, Any]:
            try:
                await self._data(transfer)
                return await self._read(vm, transfer, progress)
            except HvError as exc:
                self._fail_queue(transfer, exc)
                raise
            except asyncio.CancelledError:
                self._fail_queue(transfer, Cancelled(f"the copy of {path} was cancelled"))
                raise

        return self._register(transfer, "copy-from-guest", body)

    @staticmethod
    def _fail_queue(transfer: Transfer, error: HvError) -> None:
        while not transfer.queue.empty():
            transfer.queue.get_nowait()
        transfer.queue.put_nowait(error)

    async def _put(self, transfer: Transfer, item: bytes | None) -> None:
        try:
            async with asyncio.timeout(self.policy.stall_timeout):
                await transfer.queue.put(item)
        except TimeoutError:
            raise OperationTimeout(f"the client read nothing for "
                                   f"{self.policy.stall_timeout:g} s") from None

    async def _read(self, vm: VmController, t: Transfer, progress: Progress
                    ) -> dict[str, Any]:
        handle = await guest_io.GuestFile.open(vm.agent, t.guest_path, "rb",
                                               call_timeout=self.policy.chunk_timeout)
        digest, sent = hashlib.sha256(), 0
        try:
            while sent < t.size:
                data, eof = await handle.read(min(self.policy.read_chunk, t.size - sent))
                if not data and eof:
                    raise GuestCommandError(
                        f"{t.guest_path} in VM '{vm.record.name}' shrank while it was "
                        f"copied ({sent} of {t.size} bytes)", path=t.guest_path)
                digest.update(data)
                sent += len(data)
                if sent >= t.size and digest.hexdigest() != t.sha256:
                    raise GuestCommandError(
                        f"{t.guest_path} in VM '{vm.record.name}' changed while it was "
                        "copied (its sha256 no longer matches)", path=t.guest_path)
                await self._put(t, data)
                progress(100 * sent / max(t.size, 1), f"{sent} of {t.size} bytes")
        finally:
            await handle.close()
        await self._put(t, None)
        return {"vm": vm.record.name, "guest_path": t.guest_path, "size": sent,
                "sha256": t.sha256, "verified": "sha256sum in the guest before reading"}

    def stream(self, vm: VmController, transfer_id: str
               ) -> tuple[Transfer, AsyncIterator[bytes]]:
        """The download and its bytes; the iterator raises (ending the response early)
        if the copy fails, and cancels the copy if it is closed before the end."""
        transfer = self._transfer(vm, transfer_id, "from-guest")
        transfer.data.set_result(_nothing())
        return transfer, self._drain(transfer)

    async def _drain(self, transfer: Transfer) -> AsyncIterator[bytes]:
        job = transfer.job
        assert job is not None
        try:
            while True:
                try:
                    async with asyncio.timeout(self.policy.stall_timeout
                                               + self.policy.chunk_timeout):
                        item = await transfer.queue.get()
                except TimeoutError:
                    raise OperationTimeout(f"the copy of {transfer.guest_path} stalled"
                                           ) from None
                if item is None:
                    return
                if isinstance(item, HvError):
                    raise item
                yield item
        finally:
            if not job.done.is_set():
                self._jobs.cancel(job.id)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
