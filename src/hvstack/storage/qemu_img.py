"""An async runner for ``qemu-img``, with progress and errors that carry its message.

Contract:

* :func:`run_qemu_img` starts ``qemu-img`` with an argv list (never a shell), stdin
  closed, and returns its stdout as text when it exits 0. Every run has a timeout; on
  expiry the process is killed and :class:`~hvstack.errors.OperationTimeout` raised.
* On cancellation (:class:`asyncio.CancelledError`) the process is killed and reaped,
  and the cancellation is re-raised, never swallowed. Callers own any file it wrote.
* A non-zero exit becomes an :class:`~hvstack.errors.HvError` chosen by
  :func:`error_from_stderr` from qemu-img's own message: a lock held by another process
  is ``ResourceBusy``, a missing file ``NotFound``, a full disk ``NoSpace``,
  an unsupported or invalid request ``InvalidInput``, anything else ``HypervisorError``.
* With ``progress``, the percentages qemu-img prints for ``-p`` (``"    (12.34/100%)\\r"``)
  are parsed from stdout as they arrive (:class:`ProgressParser`, pure) and passed to
  the callback as floats in 0..100, never decreasing, ending with 100 on success. The
  caller adds ``-p`` to the args.

Callers pass absolute paths (so none can be read as an option or a ``proto:`` prefix),
put ``--`` before positional file names where qemu-img accepts it, give formats
explicitly with ``-f`` wherever they know them (no format probing of guest-written
data), and pass backing files with ``-b PATH -F FMT`` rather than inside ``-o``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
from collections.abc import Callable, Sequence

from hvstack.errors import (
    HvError,
    HypervisorError,
    InvalidInput,
    NoSpace,
    NotFound,
    OperationTimeout,
    ResourceBusy,
)

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QUICK_TIMEOUT = 60.0
"""Seconds for operations that only touch metadata: info, create, resize."""
LONG_TIMEOUT = 24 * 3600.0
"""Seconds for operations that copy data: convert, commit, compact."""
KILL_TIMEOUT = 10.0

ProgressFn = Callable[[float], None]

_PROGRESS = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")
_READ_SIZE = 4096


def parse_progress(text: str) -> float | None:
    """Return the percentage in one qemu-img progress segment, or None if it has none.

    >>> parse_progress("    (12.34/100%)")
    12.34
    """
    match = _PROGRESS.search(text)
    if match is None:
        return None
    return min(100.0, max(0.0, float(match.group(1))))


class ProgressParser:
    """Turns a stream of qemu-img stdout text into progress values (pure, no I/O).

    Segments end at ``\\r`` or ``\\n``; a segment split across two chunks is joined.
    Values are clamped to 0..100 and a value lower than the last one is dropped.
    """

    def __init__(self) -> None:
        self._pending = ""
        self.last: float | None = None

    def feed(self, text: str) -> list[float]:
        """Return the new progress values completed by ``text``."""
        segments = re.split(r"[\r\n]", self._pending + text)
        self._pending = segments.pop()
        return self._values(segments)

    def close(self) -> list[float]:
        """Return a value left in an unterminated last segment, if any."""
        pending, self._pending = self._pending, ""
        return self._values([pending])

    def _values(self, segments: list[str]) -> list[float]:
        values: list[float] = []
        for segment in segments:
            value = parse_progress(segment)
            if value is None or (self.last is not None and value <= self.last):
                continue
            self.last = value
            values.append(value)
        return values


def _message(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    lines = [line.removeprefix("qemu-img:").strip() for line in lines]
    return "; ".join(lines) if lines else "no message"


_CLASSES: tuple[tuple[tuple[str, ...], type[HvError]], ...] = (
    (("failed to get", "lock"), ResourceBusy),
    (("no space left on device",), NoSpace),
    (("disk quota exceeded",), NoSpace),
    (("no such file or directory",), NotFound),
    (("not supported",), InvalidInput),
    (("does not support",), InvalidInput),
    (("--shrink",), InvalidInput),
    (("invalid",), InvalidInput),
    (("unknown",), InvalidInput),
    (("too large",), InvalidInput),
    (("must be",), InvalidInput),
    (("is not in",), InvalidInput),
)


def error_from_stderr(args: Sequence[str], returncode: int, stderr: str) -> HvError:
    """Return the error for a qemu-img run that exited ``returncode`` (pure)."""
    command = args[0] if args else "(none)"
    message = _message(stderr)
    lowered = stderr.lower()
    cls: type[HvError] = HypervisorError
    for needles, candidate in _CLASSES:
        if all(needle in lowered for needle in needles):
            cls = candidate
            break
    return cls(
        f"qemu-img {command} failed: {message}",
        tool="qemu-img",
        command=command,
        exit_code=returncode,
        stderr=stderr.strip()[-2000:],
    )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        await asyncio.wait_for(proc.wait(), KILL_TIMEOUT)
    except TimeoutError:
        log.warning("qemu-img pid %s did not exit %ss after SIGKILL", proc.pid, KILL_TIMEOUT)


async def _read_stdout(
    stream: asyncio.StreamReader, progress: ProgressFn | None, parser: ProgressParser
) -> str:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    while True:
        chunk = await stream.read(_READ_SIZE)
        text = decoder.decode(chunk, final=not chunk)
        parts.append(text)
        if progress is not None:
            for value in parser.feed(text) if chunk else parser.close():
                progress(value)
        if not chunk:
            return "".join(parts)


async def run_qemu_img(
    args: Sequence[str],
    *,
    timeout: float = QUICK_TIMEOUT,
    progress: ProgressFn | None = None,
    binary: str = QEMU_IMG,
) -> str:
    """Run ``qemu-img *args`` and return its stdout; raise an HvError if it fails."""
    argv = [binary, *args]
    log.debug("running %s", argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise HypervisorError(f"{binary} is not installed (install qemu-utils)") from exc
    assert proc.stdout is not None and proc.stderr is not None
    parser = ProgressParser()
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr_bytes = await asyncio.gather(
                _read_stdout(proc.stdout, progress, parser), proc.stderr.read()
            )
            returncode = await proc.wait()
    except TimeoutError as exc:
        await _kill(proc)
        command = args[0] if args else "(none)"
        raise OperationTimeout(
            f"qemu-img {command} did not finish within {timeout:g} s; it was stopped",
            tool="qemu-img",
            command=command,
            timeout=timeout,
        ) from exc
    except BaseException:
        await _kill(proc)
        raise
    stderr = stderr_bytes.decode("utf-8", errors="replace")
    if returncode != 0:
        raise error_from_stderr(args, returncode, stderr)
    if progress is not None and parser.last != 100.0:
        progress(100.0)
    if stderr.strip():
        log.debug("qemu-img %s: %s", args[0] if args else "", _message(stderr))
    return stdout
