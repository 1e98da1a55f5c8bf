"""qemu-img steps on one file of a chain that never open its parent.

A running QEMU holds the files of its chain locked and a parent may be large or on
another root, so these read or write only the file named, with every format given
(never probed):

* :func:`virtual_size`: the size the guest sees (``qemu-img info -U``: a running VM
  may hold the file);
* :func:`create_on`: a new, empty file of that size whose header names a parent
  (``create -u``: the parent is not opened), or a new flat file without one;
* :func:`repoint`: make a qcow2 file name another parent with the same contents
  (``rebase -u``: a copied or merged parent; nothing is copied or checked).
"""

from __future__ import annotations

from pathlib import Path

from hvstack.errors import HypervisorError
from hvstack.storage import chain
from hvstack.storage.qemu_img import QUICK_TIMEOUT, run_qemu_img


async def virtual_size(path: Path | str, fmt: str) -> int:
    info = await chain.info_one(Path(path), fmt, QUICK_TIMEOUT)
    size = info.get("virtual-size")
    if not isinstance(size, int):
        raise HypervisorError(f"qemu-img info gives no virtual size for {path}", path=str(path))
    return size


async def create_on(path: Path | str, size: int, parent: str | None,
                    parent_format: str | None, fmt: str = "qcow2") -> None:
    """Create ``path`` (``fmt``, ``size`` bytes); with ``parent``, a file naming it."""
    args = ["create", "-q", "-f", fmt]
    if parent is not None:
        args += ["-F", parent_format or "qcow2", "-b", parent, "-u"]
    await run_qemu_img([*args, "--", str(path), str(size)])


async def repoint(path: Path | str, parent: str, parent_format: str,
                  fmt: str = "qcow2") -> None:
    await run_qemu_img(["rebase", "-u", "-f", fmt, "-F", parent_format, "-b", parent,
                        "--", str(path)])
