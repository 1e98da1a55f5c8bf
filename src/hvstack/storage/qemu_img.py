"""An async runner for ``qemu-img``, with progress and errors that carry its message.

Contract:

* :func:`run_qemu_img` runs ``qemu-img`` through :func:`hvstack.runner.run` (argv list,
  stdin closed, a timeout, the process group killed on timeout or cancellation, which
  is re-raised) and returns its stdout as text when it exits 0. Callers own any file
  it wrote.
* A non-zero exit becomes an :class:`~hvstack.errors.HvError` chosen by
  :func:`error_from_stderr` from qemu-img's own message: a lock held by another process
  is ``ResourceBusy``, a missing file ``NotFound``, a full disk ``NoSpace``,
  an unsupported or invalid request ``InvalidInput``, anything else ``HypervisorError``.
* With ``progress``, the percentages qemu-img prints for ``-p`` (``"    (12.34/100%)\\r"``)
  are parsed from stdout as they arrive (:func:`parse_progress`, pure) and passed to
  the callback as ``progress(percent, "")``, never decreasing, ending with 100 on
  success. The caller adds ``-p`` to the args.

Callers pass absolute paths (so none can be read as an option or a ``proto:`` prefix),
put ``--`` before positional file names where qemu-img accepts it, give formats
explicitly with ``-f`` wherever they know them (no format probing of guest-written
data), and pass backing files with ``-b PATH -F FMT`` rather than inside ``-o``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from hvstack import runner
from hvstack.errors import (
    HvError,
    HypervisorError,
    InvalidInput,
    NoSpace,
    NotFound,
    OperationTimeout,
    ResourceBusy,
)
from hvstack.progress import Progress

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QUICK_TIMEOUT = 60.0
"""Seconds for operations that only touch metadata: info, create, resize."""
LONG_TIMEOUT = 24 * 3600.0
"""Seconds for operations that copy data: convert, commit, compact."""

# The progress type of hvstack (percent, message); kept under this name for callers.
ProgressFn = Progress

_PROGRESS = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")


def parse_progress(text: str) -> float | None:
    """Return the percentage in one qemu-img progress segment, or None if it has none.

    >>> parse_progress("    (12.34/100%)")
    12.34
    """
    match = _PROGRESS.search(text)
    if match is None:
        return None
    return min(100.0, max(0.0, float(match.group(1))))


class ProgressParser(runner.ProgressParser):
    """Turns qemu-img's ``-p`` output into progress values (pure, no I/O)."""

    def __init__(self) -> None:
        super().__init__(parse_progress)


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


async def run_qemu_img(
    args: Sequence[str],
    *,
    timeout: float = QUICK_TIMEOUT,
    progress: Progress | None = None,
    binary: str = QEMU_IMG,
) -> str:
    """Run ``qemu-img *args`` and return its stdout; raise an HvError if it fails."""
    command = args[0] if args else "(none)"
    try:
        stdout = await runner.run(
            [binary, *args], timeout=timeout, progress=progress,
            parse=parse_progress if progress is not None else None,
            errors=lambda code, stderr: error_from_stderr(args, code, stderr),
            package="qemu-utils",
        )
    except OperationTimeout as exc:
        raise OperationTimeout(
            f"qemu-img {command} did not finish within {timeout:g} s; it was stopped",
            tool="qemu-img",
            command=command,
            timeout=timeout,
        ) from exc
    return stdout.decode("utf-8", errors="replace")
