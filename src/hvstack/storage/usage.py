"""Who uses a disk, and which operations that use forbids: one rule for the whole host.

:func:`check_use` is pure: it takes the VMs' attachments, the known child-to-parent
links and the managed images folder, and raises :class:`~hvstack.errors.ResourceBusy`
when ``operation`` on ``path`` would change a disk something else depends on:

==============  ==========================================================================
operation       refused when ``path`` is ...
==============  ==========================================================================
``modify``      attached to any VM (in any state: a VM's disks change only through that
                VM's operations), the parent of a known disk, or a managed image
                (resize, compact, merge of the disk itself, delete)
``merge-into``  the same as ``modify``, except that the child being merged into it does
                not count (the parent a merge writes)
``read``        attached to a VM that is not Off (convert reading it as a source)
``new-parent``  attached to any VM (it would change under the new child); an image is fine
``attach``      a managed image, the parent of a known disk, attached to ``vm_id``
                already, or attached to another VM that is not Off
``start``       attached to another VM that is not Off, the parent of a known disk, or a
                managed image; a parent in the chain of the starting VM is checked as
                ``read``
==============  ==========================================================================

The known links come from :func:`scan_parents` (qcow2 headers under the storage roots
and of every attached disk): a false link only makes the rule stricter.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hvstack.errors import ResourceBusy

Operation = Literal["modify", "merge-into", "read", "new-parent", "attach", "start"]
MAX_SCANNED = 20000
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Attached:
    """A disk attached to a VM, as the rule needs it."""

    path: Path
    vm: str
    vm_id: str
    state: str
    """The VM's state as Hyper-V names it ("Off", "Running", ...)."""

    @property
    def off(self) -> bool:
        return self.state == "Off"


def _busy(path: Path, operation: Operation, why: str, **data: str | list[str]) -> ResourceBusy:
    verbs = {"modify": "change", "merge-into": "merge into", "read": "read",
             "new-parent": "use as a parent", "attach": "attach", "start": "use"}
    return ResourceBusy(f"cannot {verbs[operation]} '{path}': {why}", disk=str(path), **data)


def _children(path: Path, parents: Mapping[Path, Path], but: Path | None) -> list[Path]:
    return sorted(child for child, parent in parents.items() if parent == path and child != but)


def check_use(
    path: Path,
    operation: Operation,
    attachments: Sequence[Attached],
    parents: Mapping[Path, Path],
    *,
    images_dir: Path,
    vm_id: str | None = None,
    child: Path | None = None,
) -> None:
    """Raise ResourceBusy if ``operation`` may not touch ``path`` (see the module doc)."""
    on_path = [a for a in attachments if a.path == path]
    others = [a for a in on_path if a.vm_id != vm_id]
    image = path.is_relative_to(images_dir)
    children = _children(path, parents, child)
    if operation in ("modify", "merge-into", "new-parent"):
        if on_path:
            a = on_path[0]
            raise _busy(path, operation, f"it is attached to VM '{a.vm}' ({a.state}); a VM's "
                        "disk changes only through the VM (detach it first)", vm=a.vm)
        if operation == "new-parent":
            return
    if operation == "read":
        for a in on_path:
            if not a.off:
                raise _busy(path, operation, f"VM '{a.vm}' is using it ({a.state})", vm=a.vm)
        return
    if operation in ("attach", "start"):
        if operation == "attach" and len(others) < len(on_path):
            raise _busy(path, operation, "it is attached to this VM already")
        for a in others:
            if not a.off:
                raise _busy(path, operation, f"it is in use by VM '{a.vm}' ({a.state})",
                            vm=a.vm)
    if image:
        raise _busy(path, operation, "it is a managed image, the read-only parent of the "
                    "VMs created from it; create a differencing disk from it instead")
    if children:
        shown = ", ".join(f"'{c}'" for c in children[:3])
        more = f" and {len(children) - 3} more" if len(children) > 3 else ""
        raise _busy(path, operation, f"it is the parent of {shown}{more}; writing it would "
                    "corrupt them", children=[str(c) for c in children])


# -- the links (I/O) ----------------------------------------------------------------------


def qcow2_parent(path: Path) -> Path | None:
    """The parent a qcow2 header names, resolved; None if none or not qcow2.

    Reads only the header, never the parent: what it finds is a claim, used to refuse.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
                return None
            offset, size = struct.unpack_from(">QI", header, 8)
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None
    full = name if os.path.isabs(name) else os.path.join(path.parent, name)
    return Path(os.path.realpath(full))


def _qcow2_files(roots: Iterable[Path], skip: Sequence[Path]) -> Iterable[Path]:
    count = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            dirs[:] = [d for d in dirs if here / d not in skip and not d.startswith(".")]
            for name in files:
                if name.endswith(".qcow2") and not name.startswith("."):
                    count += 1
                    if count > MAX_SCANNED:
                        return
                    yield here / name


def scan_parents(roots: Iterable[Path], attached: Iterable[Path],
                 skip: Sequence[Path] = ()) -> dict[Path, Path]:
    """Child-to-parent links of the qcow2 files under ``roots`` and of ``attached``."""
    links: dict[Path, Path] = {}
    for path in {*_qcow2_files(roots, skip), *attached}:
        parent = qcow2_parent(path)
        if parent is not None:
            links[Path(os.path.realpath(path))] = parent
    return links
