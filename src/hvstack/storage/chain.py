"""A disk's backing chain, read one member at a time and checked before each is opened.

``qemu-img info --backing-chain`` (and QEMU opening a disk without its chain spelled
out) follows whatever a header names: an absolute path outside the storage roots, a
``json:`` or ``nbd:`` pseudo-filename, a parent without a format (then probed). So
:func:`read_chain` walks the chain itself:

* each member is opened with ``qemu-img info -f FORMAT`` (its known format; the top's
  from the caller, a parent's from its child's header), which reads that one header and
  never a backing file; with ``headers=True`` a qcow2 member's header is read in Python
  instead (:mod:`hvstack.storage.qcow2_header`, the links only; qemu-img still reads
  any header it does not fully understand, and every other format);
* a parent must be named by a plain path (no ``proto:`` prefix), have its format in the
  child's header (one of qcow2, raw, vhdx, vpc, agreeing with the parent's extension
  when it has a known one), lie inside ``roots`` once resolved, and pass ``guard`` (the
  host refuses its own files there); a chain deeper than :data:`MAX_DEPTH` or with a
  loop is refused;
* an external data file (qcow2 ``data_file``) is refused on every member: hvstack
  never makes one, and it is a second file a header could point anywhere.

Refusals are :class:`~hvstack.errors.PathNotAllowed` (outside the roots, a service
file) or :class:`~hvstack.errors.InvalidInput`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import HypervisorError, InvalidInput, NotFound
from hvstack.storage.formats import QEMU_FORMATS, extension_format, user_name
from hvstack.storage.paths import confine
from hvstack.storage.qcow2_header import read_links
from hvstack.storage.qemu_img import run_qemu_img

MAX_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
Json = dict[str, object]
Guard = Callable[[Path], object]


@dataclass(frozen=True)
class Member:
    """One disk of a chain: its resolved path, its format and what qemu-img said."""

    path: Path
    format: str
    info: Json


def text_field(entry: Json, key: str) -> str | None:
    """``entry[key]`` if it is a string (qemu-img's JSON, read without trusting it)."""
    value = entry.get(key)
    return value if isinstance(value, str) else None


async def info_one(path: Path, fmt: str, timeout: float) -> Json:
    """``qemu-img info -f fmt`` of ``path`` alone (no backing file is opened)."""
    if not path.exists():
        raise NotFound(f"disk '{path}' does not exist", path=str(path))
    if not path.is_file():
        raise InvalidInput(f"disk '{path}' is not a file", path=str(path))
    stdout = await run_qemu_img(
        ["info", "-U", "--output=json", "-f", fmt, "--", str(path)], timeout=timeout
    )
    try:
        data: object = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise HypervisorError(f"qemu-img info printed no JSON for '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise HypervisorError(f"qemu-img info printed unexpected JSON for '{path}'")
    return data


async def links_one(path: Path, fmt: str, timeout: float) -> Json:
    """The links of ``path`` (opened as ``fmt``): a qcow2 header read in Python when it
    is one :func:`~hvstack.storage.qcow2_header.parse` understands, else qemu-img's."""
    if fmt == "qcow2" and path.is_file():
        # On the loop: at most READ_LIMIT bytes of a local file, cheaper than a thread
        # hop (which costs the start about 1 ms under load).
        links = read_links(path)
        if links is not None:
            return links.as_info()
    return await info_one(path, fmt, timeout)


def data_file(entry: Json) -> str | None:
    """The external data file a qcow2 header names, if any."""
    specific = entry.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    value = data.get("data-file") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _parent(child: Member, roots: Sequence[Path] | None, guard: Guard | None) -> Member | None:
    stored = text_field(child.info, "backing-filename")
    if not stored:
        return None
    what = f"parent disk of '{child.path}'"
    if _PROTOCOL.match(stored):
        raise InvalidInput(f"the {what} is named '{stored}', not a file path; refused",
                           path=str(child.path))
    fmt = text_field(child.info, "backing-filename-format")
    if fmt not in QEMU_FORMATS:
        raise InvalidInput(
            f"'{child.path}' names its parent '{stored}' without a known format; set it with "
            "'qemu-img rebase -u -F FORMAT -b PARENT' if you trust the file",
            path=str(child.path),
        )
    full = stored if os.path.isabs(stored) else os.path.join(child.path.parent, stored)
    parent = confine(full, roots, what=what) if roots is not None else Path(full).resolve()
    if guard is not None:
        guard(parent)
    named = extension_format(parent)
    if named is not None and named != fmt:
        raise InvalidInput(
            f"'{child.path}' says its parent '{parent}' is a {user_name(fmt)} disk, but the "
            f"parent is named as {user_name(named)}; refused",
            path=str(child.path),
        )
    return Member(parent, fmt, {})


async def read_chain(
    path: Path,
    fmt: str,
    *,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float,
    headers: bool = False,
) -> list[Member]:
    """Return ``path`` (opened as ``fmt``) and its parents down to the base, checked.
    ``headers``: only the links are wanted (each member's ``info`` may hold nothing
    else), so qcow2 headers are read in Python (see the module doc)."""
    read = links_one if headers else info_one
    members: list[Member] = []
    current: Member | None = Member(path, fmt, {})
    while current is not None:
        if any(m.path == current.path for m in members):
            raise InvalidInput(f"the backing chain of '{path}' loops at '{current.path}'",
                               path=str(path))
        if len(members) >= MAX_DEPTH:
            raise InvalidInput(f"the backing chain of '{path}' is deeper than {MAX_DEPTH}",
                               path=str(path))
        info = await read(current.path, current.format, timeout)
        if (external := data_file(info)) is not None:
            raise InvalidInput(
                f"'{current.path}' keeps its data in the external file '{external}'; hvstack "
                "does not use qcow2 data files",
                path=str(current.path),
            )
        current = Member(current.path, current.format, info)
        members.append(current)
        current = _parent(current, roots, guard)
    return members
