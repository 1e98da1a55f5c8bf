"""The one way hvstack runs a program: argv list, timeout, cancellation, mapped errors.

Contract of :func:`run`:

* ``argv`` is a list (never a shell); stdin is ``input`` or closed; stdout is returned
  as bytes when the exit status is in ``ok_codes``; stderr is captured.
* The program runs in its own session (process group). On timeout, cancellation or any
  other exception the whole group is killed (SIGKILL) and reaped, then
  :class:`~hvstack.errors.OperationTimeout` is raised for a timeout and a cancellation
  is re-raised, never swallowed.
* A program that is not installed is a :class:`~hvstack.errors.HypervisorError` naming
  it (and ``package``, the Debian package to install, when given). A failed exit is the
  error ``errors(returncode, stderr)`` returns, by default a ``HypervisorError`` with the
  tool, exit code and the tail of stderr (stdout's when stderr is empty).
* With ``progress`` and ``parse``, stdout is read as it arrives and cut into segments at
  ``\\r`` or ``\\n``; ``parse(segment)`` returns a percentage or None, and each new,
  higher value (clamped to 0..100) goes to ``progress(percent, "")``, ending with 100.
* ``pass_fds`` are inherited by the program under the same numbers (the rest are
  closed), for QEMU's ``fd=N`` and ``/dev/fdset/N`` options.

Example::

    out = await run(["qemu-img", "info", "--output=json", "--", path], timeout=60,
                    package="qemu-utils")
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hvstack.errors import HvError, HypervisorError, OperationTimeout
from hvstack.progress import Progress

log = logging.getLogger(__name__)

KILL_TIMEOUT = 10.0
_READ_SIZE = 4096

ErrorMap = Callable[[int, str], HvError]
"""Maps a failed run's exit status and stderr text to the error to raise."""


class ProgressParser:
    """Turns a stream of program output into progress values (pure, no I/O).

    Segments end at ``\\r`` or ``\\n``; a segment split across two chunks is joined.
    Values are clamped to 0..100 and a value not above the last one is dropped.
    """

    def __init__(self, parse: Callable[[str], float | None]) -> None:
        self._parse = parse
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
            value = self._parse(segment)
            if value is None:
                continue
            value = min(100.0, max(0.0, value))
            if self.last is not None and value <= self.last:
                continue
            self.last = value
            values.append(value)
        return values


def tail(data: bytes, limit: int = 2000) -> str:
    """The last ``limit`` characters of a program's output, as text."""
    return data.decode("utf-8", errors="replace").strip()[-limit:]


def _default_errors(tool: str, argv: Sequence[str]) -> ErrorMap:
    def error(returncode: int, stderr: str) -> HvError:
        return HypervisorError(
            f"{tool} failed (exit {returncode}): {stderr or 'no message'}",
            tool=tool, argv=list(argv), exit_code=returncode, stderr=stderr,
        )

    return error


async def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the program's process group and reap the program."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        await asyncio.wait_for(proc.wait(), KILL_TIMEOUT)
    except TimeoutError:
        log.warning("pid %s did not exit %ss after SIGKILL", proc.pid, KILL_TIMEOUT)


async def _read(stream: asyncio.StreamReader, progress: Progress | None,
                parser: ProgressParser | None) -> bytes:
    if progress is None or parser is None:
        return await stream.read()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[bytes] = []
    while True:
        chunk = await stream.read(_READ_SIZE)
        parts.append(chunk)
        text = decoder.decode(chunk, final=not chunk)
        for value in parser.feed(text) if chunk else parser.close():
            progress(value, "")
        if not chunk:
            return b"".join(parts)


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    ok_codes: tuple[int, ...] = (0,),
    errors: ErrorMap | None = None,
    progress: Progress | None = None,
    parse: Callable[[str], float | None] | None = None,
    pass_fds: Sequence[int] = (),
    package: str | None = None,
    stdout: bool = True,
) -> bytes:
    """Run ``argv``; return its stdout (b"" when ``stdout`` is False: not captured)."""
    args = [os.fspath(a) for a in argv]
    tool = Path(args[0]).name
    log.debug("running %s", args)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        hint = f" (apt-get install {package})" if package else ""
        raise HypervisorError(f"{tool} is not installed{hint}", tool=tool) from exc
    parser = ProgressParser(parse) if parse is not None else None
    try:
        async with asyncio.timeout(timeout):
            out, err = await asyncio.gather(
                _read(proc.stdout, progress, parser) if proc.stdout else _nothing(),
                _feed_and_read(proc, input),
            )
            returncode = await proc.wait()
    except TimeoutError as exc:
        await kill_group(proc)
        raise OperationTimeout(
            f"{tool} did not finish within {timeout:g} s; it was stopped",
            tool=tool, timeout=timeout,
        ) from exc
    except BaseException:
        await kill_group(proc)
        raise
    if returncode not in ok_codes:
        message = tail(err) or tail(out)
        raise (errors or _default_errors(tool, args))(returncode, message)
    if progress is not None and parser is not None and parser.last != 100.0:
        progress(100.0, "")
    return out


async def _nothing() -> bytes:
    return b""


async def _feed_and_read(proc: asyncio.subprocess.Process, data: bytes | None) -> bytes:
    """Write ``data`` to stdin (then close it) while reading all of stderr."""
    assert proc.stderr is not None

    async def feed() -> None:
        if proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                proc.stdin.write(data)
                await proc.stdin.drain()
            proc.stdin.close()

    _, err = await asyncio.gather(feed(), proc.stderr.read())
    return err
