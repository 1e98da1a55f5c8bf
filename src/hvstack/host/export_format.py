"""The on-disk layout of an exported VM, versioned, and its record (``vm.json``).

An export of VM ``NAME`` into ``DIR`` is the folder ``DIR/NAME``, laid out as Hyper-V
lays out its exports::

    DIR/NAME/vm.json                     this module's :class:`Manifest`
    DIR/NAME/Virtual Hard Disks/...      every disk file (active files, checkpoint files,
                                         the parents of both), each once
    DIR/NAME/Snapshots/<cp id>.vmstate   the checkpoints' memory states, adapter layouts
                                         and UEFI variables (.layout.json, .efivars)
    DIR/NAME/Virtual Machines/...        the VM's own saved state, its layout and its
                                         UEFI variables

Every path in ``vm.json`` is relative to ``DIR/NAME`` (POSIX form); a qcow2 file's
header names its parent by a name relative to its own folder, so the folder can be
moved or copied whole. ``files`` is the export's record of each disk file's format and
parent: an import opens nothing in another format and follows no other link (it checks
each header against this record, never probes). :func:`relative_name` is the one check
a name from ``vm.json`` passes before it is joined to the folder.

Pure: no I/O besides :func:`Manifest.read` and :func:`Manifest.write`.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from hvstack.checkpoints.model import Checkpoint, CheckpointTree
from hvstack.compute.model import VmConfig
from hvstack.errors import InvalidInput, NotFound
from hvstack.storage.formats import QEMU_FORMATS, extension_format

FORMAT = "hvstack-vm-export"
VERSION = 1
MANIFEST = "vm.json"
DISKS = "Virtual Hard Disks"
SNAPSHOTS = "Snapshots"
MACHINE = "Virtual Machines"
MAX_MANIFEST = 16 * 1024 * 1024  # a vm.json larger than this is not one we wrote


@dataclass(frozen=True)
class ExportedFile:
    """One disk file of the export: its name, the format it is opened in, the name of
    its parent (None: a base), all relative to the export folder."""

    path: str
    format: str
    parent: str | None = None
    parent_format: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "parent": self.parent,
                "parent_format": self.parent_format}


@dataclass(frozen=True)
class Manifest:
    """What ``vm.json`` holds. ``state``: "Off" or "Saved" (a running VM is exported as
    Off, from one point in time); ``consistency``: how its disks were caught
    ("offline", "frozen": the guest's file systems were frozen, "crash-consistent")."""

    vm_id: str
    config: VmConfig
    files: tuple[ExportedFile, ...]
    tree: CheckpointTree = field(default_factory=CheckpointTree)
    state: str = "Off"
    saved_state: str | None = None
    saved_layout: str | None = None
    efi_vars: str | None = None
    exported_at: float = 0.0
    consistency: str = "offline"
    source: str = "vm"  # "vm", or "checkpoint:<name>" for a checkpoint's export

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "version": VERSION, "id": self.vm_id,
            "config": json.loads(self.config.to_json()),
            "files": [f.to_json() for f in self.files],
            "checkpoints": json.loads(self.tree.to_json()), "state": self.state,
            "saved_state": self.saved_state, "saved_layout": self.saved_layout,
            "efi_vars": self.efi_vars, "exported_at": self.exported_at,
            "consistency": self.consistency, "source": self.source,
        }, indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Manifest:
        """The manifest ``text`` holds; InvalidInput saying what is wrong otherwise."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise InvalidInput(f"{MANIFEST} is not an hvstack VM export")
            version = raw.get("version")
            if version != VERSION:
                raise InvalidInput(f"{MANIFEST} is export format version {version}; this "
                                   f"hvstack reads version {VERSION}", version=str(version))
            files = tuple(_file(f) for f in raw["files"])
            tree = CheckpointTree.from_json(json.dumps(raw.get("checkpoints") or {}))
            state = str(raw.get("state", "Off"))
            if state not in ("Off", "Saved"):
                raise InvalidInput(f"{MANIFEST} gives the VM's state as '{state}'")
            return Manifest(
                str(raw["id"]), VmConfig.from_json(json.dumps(raw["config"])), files,
                replace(tree, pending=None), state, _optional(raw, "saved_state"),
                _optional(raw, "saved_layout"), _optional(raw, "efi_vars"),
                float(raw.get("exported_at", 0.0)), str(raw.get("consistency", "offline")),
                str(raw.get("source", "vm")))
        except InvalidInput:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{MANIFEST} cannot be read: {type(exc).__name__}: {exc}"
                               ) from None

    @staticmethod
    def read(folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file() or path.is_symlink():
            raise NotFound(f"'{folder}' holds no {MANIFEST}: it is not an hvstack export",
                           path=str(folder))
        if path.stat().st_size > MAX_MANIFEST:
            raise InvalidInput(f"{path} is too large to be an export's record")
        return Manifest.from_json(path.read_text(encoding="utf-8"))

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(self.to_json() + "\n", encoding="utf-8")

    def by_path(self) -> dict[str, ExportedFile]:
        return {f.path: f for f in self.files}


def _optional(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return None if value is None else str(value)


def _file(raw: Mapping[str, Any]) -> ExportedFile:
    fmt = str(raw["format"])
    parent = raw.get("parent")
    parent_format = raw.get("parent_format")
    if fmt not in QEMU_FORMATS or (parent is not None and parent_format not in QEMU_FORMATS):
        raise InvalidInput(f"{MANIFEST} names a disk format that is not one of "
                           f"{', '.join(QEMU_FORMATS)}")
    return ExportedFile(str(raw["path"]), fmt, None if parent is None else str(parent),
                        None if parent is None else str(parent_format))


def relative_name(name: str) -> PurePosixPath:
    """``name`` from ``vm.json`` as a path inside the export folder; InvalidInput for an
    absolute name, '..', an empty part, a backslash or a control character."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise InvalidInput(f"the export names the file {name!r}, which is not a plain "
                           "relative name")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidInput(f"the export names the file {name!r}, with control characters")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidInput(f"the export names the file '{name}', which leads outside it")
    return path


def disk_names(paths: Iterable[str]) -> dict[str, str]:
    """A unique name under :data:`DISKS` for each disk file (its own name; ``-2``, ...
    before the extension when two files share one), by path."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        source = Path(path)
        stem, suffix = source.stem, source.suffix
        candidate, n = source.name, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}{suffix}"
        taken.add(candidate.lower())
        names[path] = f"{DISKS}/{candidate}"
    return names


def with_disk_paths(config: VmConfig, rename: Callable[[str], str]) -> VmConfig:
    """``config`` with each disk's path renamed."""
    return replace(config, disks=tuple(replace(d, path=rename(d.path)) for d in config.disks))


def relocated(tree: CheckpointTree, rename: Callable[[str], str],
              states: Callable[[str], str]) -> CheckpointTree:
    """``tree`` with its disk files renamed by ``rename`` (in each checkpoint's disks and
    its recorded settings, in ``made`` and ``bases``) and its memory states, layouts and UEFI
    variables by ``states``."""

    def one(c: Checkpoint) -> Checkpoint:
        config = c.config
        if config:
            config = with_disk_paths(VmConfig.from_json(config), rename).to_json()
        return replace(
            c, disks={d: rename(p) for d, p in c.disks.items()}, config=config,
            memory_state=None if c.memory_state is None else states(c.memory_state),
            layout=None if c.layout is None else states(c.layout),
            efi_vars=None if c.efi_vars is None else states(c.efi_vars))

    return replace(tree, checkpoints=tuple(one(c) for c in tree.checkpoints),
                   made=frozenset(rename(p) for p in tree.made if _known(p, rename)),
                   bases=frozenset(rename(p) for p in tree.bases if _known(p, rename)),
                   pending=None)


def _known(path: str, rename: Callable[[str], str]) -> bool:
    try:
        rename(path)
    except KeyError:
        return False
    return True


def state_name(path: str) -> str:
    """A checkpoint state file's name in the export: its own name under :data:`SNAPSHOTS`."""
    return f"{SNAPSHOTS}/{os.path.basename(path)}"


def named_format(name: str, fmt: str) -> bool:
    """Whether a file named ``name`` may hold format ``fmt``: its extension must name it
    (every file an export holds is named by the format rule, so the name is a record)."""
    return extension_format(Path(name)) == fmt
