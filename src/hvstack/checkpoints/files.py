"""Names of the files a checkpoint makes: pure, no I/O.

A new overlay lives in the same folder as the file it goes on top of and is named
``<stem>_<8 hex>.qcow2``, where stem is that file's stem without an earlier
``_<8 hex>`` suffix (so ``disk.qcow2`` -> ``disk_1a2b3c4d.qcow2``, and the next overlay
``disk_5e6f7a8b.qcow2``, never ``disk_1a2b3c4d_5e6f7a8b.qcow2``). A checkpoint's memory
state, adapter layout and UEFI variables are ``<checkpoint id>.vmstate``,
``.layout`` and ``.efivars`` in the VM's checkpoint folder.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Container
from pathlib import PurePath

from hvstack.checkpoints.model import MEMORY_STATE_SUFFIX

OVERLAY_SUFFIX = re.compile(r"_[0-9a-f]{8}$")
LAYOUT_SUFFIX = ".layout"
EFI_VARS_SUFFIX = ".efivars"


def overlay_stem(path: str) -> str:
    """``path``'s stem without an overlay suffix of an earlier checkpoint."""
    return OVERLAY_SUFFIX.sub("", PurePath(path).stem)


def overlay_path(frozen: str, taken: Container[str] = (),
                 token: Callable[[], str] = lambda: secrets.token_hex(4)) -> str:
    """A new overlay's path beside ``frozen``: one not in ``taken`` (the caller also
    creates it exclusively: a file that exists is never reused)."""
    parent = PurePath(frozen).parent
    stem = overlay_stem(frozen)
    while True:
        candidate = str(parent / f"{stem}_{token()}.qcow2")
        if candidate not in taken and candidate != frozen:
            return candidate


def memory_state_name(checkpoint_id: str) -> str:
    return checkpoint_id + MEMORY_STATE_SUFFIX


def layout_name(checkpoint_id: str) -> str:
    return checkpoint_id + LAYOUT_SUFFIX


def efi_vars_name(checkpoint_id: str) -> str:
    return checkpoint_id + EFI_VARS_SUFFIX
