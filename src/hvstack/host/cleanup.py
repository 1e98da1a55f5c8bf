"""What a killed host service left behind, cleaned when the service starts again.

A ``kill -9`` (or a power cut) can stop the service between any two steps of an
operation. At start-up, before it serves, the service removes what only it could have
made, and nothing else. What counts as its own:

* temporary files: names of exactly the form :func:`hvstack.files.temp_path` gives
  (``.NAME.XXXXXXXX.hvtmp``, 8 hex digits) found anywhere in a storage root, and the
  ``.NAME.EXT.tmp`` that earlier image builders left in the images folder; only
  regular files (never a link), and only when no process holds a lock on them (QEMU and
  qemu-img lock the images they write: a temporary still being written, by another
  service sharing the root or by a qemu-img the killed service left running, is kept);
* VM folders without a record: only folders in ``DATA/vms`` whose name is a VM id (a
  UUID). A folder without ``vm.json`` is a create that never finished (the record is
  written before ``vm.json``): no VM ever used its files, so it is removed. A folder
  with ``vm.json`` belonged to a VM whose record is gone (a delete cut short): if it
  holds only the service's own files (see :data:`SERVICE_FILES`) it is removed,
  otherwise it may hold disks someone wants, so it is moved whole to
  ``DATA/lost+found/ID`` and logged;
* run directories: the subfolders of this service's own run directory (named after the
  data directory, so never another service's) whose VM does not exist or is not
  running, and a stale ``qemu.pid`` of a VM that is Off or Saved.

Jobs a restart interrupted are marked failed by :meth:`JobManager.restore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hvstack.host.config import HostConfig

log = logging.getLogger(__name__)

# hvstack/files.py's temp_path: dst.parent / f".{dst.name}.{secrets.token_hex(4)}.hvtmp"
DISK_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.hvtmp")
# Image builds used ".NAME.SUFFIX.tmp" in the images folder before they used temp_path;
# a service killed then may have left one.
IMAGE_TEMP = re.compile(r"\..+\.(qcow2|raw|img|vhdx)\.tmp")
VM_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What the service itself puts in a VM's folder (besides disks it creates).
SERVICE_FILES = frozenset({"vm.json", "qemu.pid", "console.log", "efivars.fd",
                           "saved-state.bin"})
LOST_AND_FOUND = "lost+found"


@dataclass
class CleanupReport:
    temporaries: list[Path] = field(default_factory=list)
    removed_folders: list[Path] = field(default_factory=list)
    moved_folders: list[tuple[Path, Path]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)


def _unlocked(path: Path) -> bool:
    """True if no process holds a lock on ``path`` (nobody is writing it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return True


def _walk(root: Path, skip: Path) -> Iterator[Path]:
    """Regular files under ``root`` (links not followed), leaving out ``skip``."""
    for folder, dirs, files in os.walk(root, onerror=lambda exc: None):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in files:
            yield here / name


def remove_temporaries(config: HostConfig, report: CleanupReport) -> None:
    lost = config.data_dir / LOST_AND_FOUND
    seen: set[Path] = set()
    for root in config.storage_roots:
        if not root.is_dir():
            continue
        for path in _walk(root, lost):
            if path in seen or not DISK_TEMP.fullmatch(path.name):
                continue
            seen.add(path)
            _remove_temp(path, report)
    if config.images_dir.is_dir():
        for path in config.images_dir.iterdir():
            if IMAGE_TEMP.fullmatch(path.name):
                _remove_temp(path, report)


def _remove_temp(path: Path, report: CleanupReport) -> None:
    if path.is_symlink() or not path.is_file() or not _unlocked(path):
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        report.temporaries.append(path)
        log.warning("removed %s, a temporary file left by an operation that was cut short",
                    path)


def _only_service_files(folder: Path) -> bool:
    for entry in folder.iterdir():
        if entry.name in SERVICE_FILES or DISK_TEMP.fullmatch(entry.name):
            continue
        return False
    return True


def clean_vm_folders(config: HostConfig, known_ids: Iterable[str],
                     report: CleanupReport) -> None:
    if not config.vms_dir.is_dir():
        return
    known = set(known_ids)
    for folder in sorted(config.vms_dir.iterdir()):
        if not VM_ID.fullmatch(folder.name) or folder.name in known:
            continue
        if folder.is_symlink() or not folder.is_dir():
            continue
        finished_create = (folder / "vm.json").exists()
        if not finished_create or _only_service_files(folder):
            shutil.rmtree(folder, ignore_errors=True)
            report.removed_folders.append(folder)
            why = "a VM create" if not finished_create else "a VM delete"
            log.warning("removed %s, the folder of %s that was cut short", folder, why)
            continue
        target = config.data_dir / LOST_AND_FOUND / folder.name
        if target.exists():
            target = target.with_name(f"{folder.name}-{int(time.time())}")
        target.parent.mkdir(mode=0o700, exist_ok=True)
        folder.rename(target)
        report.moved_folders.append((folder, target))
        log.warning("moved %s to %s: it is the folder of a VM that no longer exists, and "
                    "holds files that may be disks; inspect them, then delete the folder",
                    folder, target)


def clean_run_dirs(config: HostConfig, running_ids: Iterable[str],
                   report: CleanupReport) -> None:
    run_dir = config.run_dir
    if not run_dir.is_dir() or run_dir.is_symlink():
        return
    running = set(running_ids)
    for entry in run_dir.iterdir():
        if VM_ID.fullmatch(entry.name) and entry.name not in running and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            report.run_dirs.append(entry)
            log.info("removed %s, the run directory of a VM that is not running", entry)
