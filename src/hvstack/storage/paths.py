"""Confining user-supplied paths to the storage roots.

Contract of :func:`confine`:

* the input must be a non-empty, absolute path (the CLI makes paths absolute before it
  sends them) without control characters and without ``,`` or ``=``, which QEMU's option
  syntax would take as separators (the classic injection); otherwise
  :class:`~hvstack.errors.InvalidInput`;
* the path is resolved fully: every symlink, including one in a parent folder, and
  every ``..``. A path that does not exist yet is resolved through its existing parents.
  The resolved path must lie inside (or be) one of the resolved ``roots``; otherwise
  :class:`~hvstack.errors.PathNotAllowed`. The resolved path is checked for the
  forbidden characters again, as a symlink may point at a name that has them;
* only then, with ``must_exist``, a missing path is :class:`~hvstack.errors.NotFound`
  (so nothing is revealed about files outside the roots).

Messages show what the user typed, never where it resolves to when that is outside the
roots (a link to ``/proc/self/fd/...`` or elsewhere on the host reveals the host's
layout): they say only that it leads out through a link or ``..``.

The result is the resolved absolute :class:`~pathlib.Path`; callers use it, never the
input. :func:`check_disk_file` then keeps the service's own files (its database, lock,
sockets, VM configs, firmware variables, saved state, logs) from being used as a disk.

Confinement is a check at one moment: whoever later creates files under the
result must still refuse to follow a link planted in between (the disk operations
create files under temporary names and link them into place).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hvstack.errors import InvalidInput, NotFound, PathNotAllowed

_FORBIDDEN = {",": "a comma", "=": "an equals sign"}


def _problem(text: str) -> str | None:
    """Return what is wrong with the characters of ``text``, or None."""
    for char in text:
        code = ord(char)
        if code < 0x20 or 0x7F <= code < 0xA0:
            return f"contains a control character ({code:#04x})"
        if char in _FORBIDDEN:
            return (
                f"contains {_FORBIDDEN[char]} ({char!r}), which QEMU would read as an "
                "option separator; rename the file or folder"
            )
    return None


def _resolve(text: str, *, what: str) -> Path:
    try:
        return Path(text).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (3.11)
        why = "a loop of symbolic links" if isinstance(exc, RuntimeError) else (
            exc.strerror or "an error")
        raise InvalidInput(f"{what} {text!r} cannot be resolved ({why})", path=text) from exc


def resolve_roots(roots: Sequence[Path]) -> list[Path]:
    """Return the roots resolved (symlinks followed), as :func:`confine` compares them."""
    return [Path(os.path.abspath(root)).resolve(strict=False) for root in roots]


def confine(
    path: str | os.PathLike[str],
    roots: Sequence[Path],
    *,
    must_exist: bool = False,
    what: str = "path",
) -> Path:
    """Return ``path`` resolved, if it lies inside one of ``roots``; raise otherwise."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text, not bytes")
    if not text.strip():
        raise InvalidInput(f"{what} is empty", path=text)
    problem = _problem(text)
    if problem:
        raise InvalidInput(f"{what} {text!r} {problem}", path=text)
    if not os.path.isabs(text):
        raise InvalidInput(f"{what} {text!r} is not absolute; give a full path", path=text)

    allowed = resolve_roots(roots)
    shown_roots = [str(root) for root in allowed]
    resolved = _resolve(text, what=what)
    if not any(resolved.is_relative_to(root) for root in allowed):
        via = "" if str(resolved) == text else " (through a symbolic link or '..')"
        inside = ", ".join(shown_roots) if shown_roots else "none are configured"
        raise PathNotAllowed(
            f"{what} '{text}' leads outside the storage roots{via}: {inside}",
            path=text,
            roots=shown_roots,
        )
    problem = _problem(str(resolved))
    if problem:
        raise InvalidInput(
            f"{what} {text!r} resolves to {str(resolved)!r}, which {problem}", path=text
        )
    if must_exist and not resolved.exists():
        raise NotFound(f"{what} '{text}' does not exist", path=text)
    return resolved


def check_disk_file(path: Path, data_dir: Path, run_dir: Path, *, what: str = "disk") -> Path:
    """Return ``path`` (resolved) if it may be a disk; PathNotAllowed if it is one of
    the service's own files.

    Nothing in the run directory is a disk. Inside the data directory only a visible
    file with a disk extension is (the service's files have none: hvstack.db, hv.lock,
    vm.json, efivars.fd, saved-state.bin, console.log, qemu.pid, ...), whatever
    ``--format`` says.
    """
    from hvstack.storage.formats import DISK_EXTENSIONS

    data, run = resolve_roots([data_dir, run_dir])
    if path.is_relative_to(run):
        raise PathNotAllowed(f"{what} '{path}' is a runtime file of the host service",
                             path=str(path))
    if path.is_relative_to(data) and (
        path.suffix.lower() not in DISK_EXTENSIONS or path.name.startswith(".")
    ):
        raise PathNotAllowed(
            f"{what} '{path}' is not a disk: the host service keeps its own files in the "
            f"data directory, where a disk's name ends in {', '.join(DISK_EXTENSIONS)}",
            path=str(path),
        )
    return path
