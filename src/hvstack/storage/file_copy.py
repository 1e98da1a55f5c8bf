"""Copying one disk file byte for byte into a new file: sparse, throttled, stoppable.

:func:`copy_file` is blocking (run it in a thread). It creates ``dst`` itself
(``O_EXCL | O_NOFOLLOW``: never a file or link that appeared meanwhile), skips runs of
zeros (holes stay holes, so a sparse raw disk stays sparse), keeps to ``bandwidth``
bytes per second when given, calls ``progress(done_bytes)`` after each chunk and
returns early with :class:`~hvstack.errors.Cancelled` once ``stop`` is set. The copy is
flushed to the device (``fsync``) before it returns, so a record naming it never
outlives its bytes. On any failure the partial ``dst`` is removed.

The bytes are copied as they are: a qcow2 file keeps its header (a backing file name
included, which the caller rewrites with ``qemu-img rebase -u`` if the parent moved).
Used for files nothing writes while they are copied (checkpoint files, the disks of a
VM that is off or saved). :func:`copy_in_thread` runs it from asyncio: progress
reported on the loop, and a cancelled caller stops the copy and waits for the thread to
end (no copy outlives its job).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hvstack.errors import Cancelled, NoSpace
from hvstack.files import remove_quietly

CHUNK = 4 * 1024 * 1024


BLOCK = 64 * 1024  # the granularity of holes (qcow2's default cluster size)


def _write_sparse(out: int, chunk: bytes) -> None:
    """Write ``chunk`` at the file position, leaving each all-zero block a hole."""
    view = memoryview(chunk)
    for start in range(0, len(chunk), BLOCK):
        block = view[start:start + BLOCK]
        if not chunk[start:start + BLOCK].strip(b"\0"):
            os.lseek(out, len(block), os.SEEK_CUR)
            continue
        while block:
            block = block[os.write(out, block):]


def copy_file(src: Path, dst: Path, *, stop: threading.Event | None = None,
              bandwidth: int | None = None,
              progress: Callable[[int], None] | None = None) -> int:
    """Copy ``src`` into the new file ``dst``; return the number of bytes copied."""
    began = time.monotonic()
    done = 0
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o644)
    try:
        with open(src, "rb") as source:
            while chunk := source.read(CHUNK):
                if stop is not None and stop.is_set():
                    raise Cancelled(f"the copy of '{src}' was stopped", path=str(src))
                _write_sparse(out, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done)
                if bandwidth:
                    ahead = done / bandwidth - (time.monotonic() - began)
                    if ahead > 0:
                        (stop or threading.Event()).wait(ahead)
        os.ftruncate(out, done)  # a run of zeros at the end is a hole, not a short file
        os.fsync(out)
    except OSError as exc:
        os.close(out)
        remove_quietly(dst)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left in '{dst.parent}' while copying '{src}'",
                          path=str(dst.parent)) from exc
        raise
    except BaseException:
        os.close(out)
        remove_quietly(dst)
        raise
    os.close(out)
    return done


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (new names) to the device."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def copy_in_thread(src: Path, dst: Path, *, bandwidth: int | None = None,
                         progress: Callable[[int], None] | None = None) -> int:
    """:func:`copy_file` in a thread; ``progress(done_bytes)`` is called on the loop."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def report(done: int) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, done)

    task = asyncio.ensure_future(asyncio.to_thread(
        copy_file, src, dst, stop=stop, bandwidth=bandwidth, progress=report))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()  # the thread ends at its next chunk
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # the copy's own Cancelled: expected, not logged
        raise
