"""Storage: virtual disks (fixed, dynamic, differencing), the qemu-img runner,
confinement of paths to the storage roots, formats decided by name (``formats``, never
probed), backing chains read member by member (``chain``) and the one disk-in-use rule
(``usage``).

Everything here takes absolute paths that :func:`confine` has resolved; no module of this
package knows about VMs, the API or the CLI.
"""

from hvstack.storage.disks import (
    DISK_KINDS,
    TARGET_FORMATS,
    DiskInfo,
    DiskKind,
    TargetFormat,
    compact_disk,
    convert_disk,
    create_disk,
    delete_disk,
    inspect_disk,
    merge_disk,
    resize_disk,
)
from hvstack.storage.paths import confine
from hvstack.storage.qemu_img import ProgressFn, run_qemu_img

__all__ = [
    "DISK_KINDS",
    "TARGET_FORMATS",
    "DiskInfo",
    "DiskKind",
    "ProgressFn",
    "TargetFormat",
    "compact_disk",
    "confine",
    "convert_disk",
    "create_disk",
    "delete_disk",
    "inspect_disk",
    "merge_disk",
    "resize_disk",
    "run_qemu_img",
]
