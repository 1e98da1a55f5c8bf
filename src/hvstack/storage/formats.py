"""Which format a disk file is: decided by its name or by the user, never by its bytes.

A raw disk holds whatever its guest wrote, including a qcow2 header that names
``/etc/shadow`` as its backing file; probing its format from its content hands the guest
the host's files. So hvstack never probes. The rule, for every disk it creates, opens,
converts or attaches (:func:`format_for`):

* the extension decides: ``.qcow2`` qcow2, ``.vhdx`` vhdx, ``.vhd`` vpc (QEMU's name
  for VHD), ``.raw`` and ``.img`` raw;
* ``format`` (the user's ``--format``) may repeat what the extension says, or name the
  format of a file whose extension is not one of these; a format that contradicts a
  known extension is :class:`~hvstack.errors.InvalidInput`, and so is an unknown
  extension without a format.

Because everything hvstack writes is named by this rule, a file's extension is
hvstack's own record of its format: a disk detached and attached again opens in the
format it was made in, whatever its guest wrote into it.
"""

from __future__ import annotations

from pathlib import Path

from hvstack.errors import InvalidInput

QEMU_FORMATS = ("qcow2", "raw", "vhdx", "vpc")
"""The formats a disk may have (QEMU's names)."""

USER_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vhdx": "vhdx", "vhd": "vpc", "vpc": "vpc"}
"""The names a user may give (``vhd`` and QEMU's ``vpc`` are the same format)."""

BY_EXTENSION = {".qcow2": "qcow2", ".vhdx": "vhdx", ".vhd": "vpc", ".raw": "raw", ".img": "raw"}
DISK_EXTENSIONS = tuple(BY_EXTENSION)

DIFFERENCING_FORMATS = ("qcow2",)
"""Formats a differencing disk can have: qemu-img 7.2 writes no VHD/VHDX with a parent
("Backing file not supported for file format 'vhdx'")."""


def user_name(fmt: str) -> str:
    """The name a user knows a QEMU format by (vpc is shown as vhd)."""
    return "vhd" if fmt == "vpc" else fmt


def extension_format(path: Path) -> str | None:
    """The QEMU format ``path``'s extension names, or None for another extension."""
    return BY_EXTENSION.get(path.suffix.lower())


def normalize(fmt: str) -> str:
    """Return QEMU's name for the user's format name; InvalidInput for an unknown one."""
    try:
        return USER_FORMATS[fmt.lower()]
    except KeyError:
        raise InvalidInput(
            f"disk format '{fmt}' is not one of qcow2, raw, vhdx, vhd", format=fmt
        ) from None


def format_for(path: Path, fmt: str | None = None, *, what: str = "disk") -> str:
    """Return the QEMU format of ``path``: by its extension unless ``fmt`` is given."""
    by_name = extension_format(path)
    wanted = normalize(fmt) if fmt else None
    if wanted is None:
        if by_name is None:
            raise InvalidInput(
                f"the {what} '{path}' has no known extension (.qcow2, .vhdx, .vhd, .raw, "
                ".img); give its format with --format",
                path=str(path),
            )
        return by_name
    if by_name is not None and by_name != wanted:
        raise InvalidInput(
            f"the {what} '{path}' is named as a {user_name(by_name)} disk but --format says "
            f"{user_name(wanted)}; name it {path.stem}{_extension_of(wanted)} or drop --format",
            path=str(path),
            format=user_name(wanted),
        )
    return wanted


def _extension_of(fmt: str) -> str:
    return next(ext for ext, f in BY_EXTENSION.items() if f == fmt)
