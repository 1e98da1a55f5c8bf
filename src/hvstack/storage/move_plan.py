"""Which of a VM's disk files a storage move takes, and where each goes (pure).

:func:`plan_move` decides, from facts gathered by the caller (no I/O here):

* per selected disk, its *files*: the active file (the one the VM's settings name),
  the files its checkpoints froze for that disk, and their parents as far as they
  belong to the VM (``vm_files``: the active files, the tree's ``made`` files and the
  files checkpoints name). A parent that is not the VM's (a managed image, a disk
  someone else made) ends the walk: it never moves.
* a file moves unless it is a managed image, already inside the destination, attached
  to another VM, or the parent of a file that does not move (every child of a moved
  file is moved too, so no file outside the move ever has its parent taken away);
  this rule runs until nothing changes. ``include_checkpoints=False`` takes only the
  active files. A read-only disk of a running VM is left (``live_read_only``: QEMU can
  only switch a writable device to a new file).
* each moved file goes to ``destination/<its name>``; a name that is taken (by a file
  there or an earlier file of the plan) gets ``-2``, ``-3``, ... before its suffix.
* :attr:`FileMove.backing` is the path the moved file's header must name afterwards:
  its parent's new path if the parent moves, else the parent where it is.

The moves come parents first, so copying them in order never names a parent that is
not there yet. Files that stay are listed in :attr:`MovePlan.skipped` with why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class DiskFiles:
    """What the plan needs of one selected disk."""

    disk_id: str
    active: str
    format: str
    read_only: bool = False
    checkpoint_files: tuple[str, ...] = ()  # what the VM's checkpoints froze for it


@dataclass(frozen=True)
class FileMove:
    disk_id: str
    old: str
    new: str
    format: str
    parent: str | None  # the parent the header names now
    backing: str | None  # the parent the copy's header must name
    backing_format: str | None
    active: bool  # the file the VM's settings name


@dataclass(frozen=True)
class MovePlan:
    moves: tuple[FileMove, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, why it stays)

    @property
    def renames(self) -> dict[str, str]:
        return {m.old: m.new for m in self.moves}

    def of_disk(self, disk_id: str) -> tuple[FileMove, ...]:
        return tuple(m for m in self.moves if m.disk_id == disk_id)

    def active(self, disk_id: str) -> FileMove | None:
        return next((m for m in self.moves if m.disk_id == disk_id and m.active), None)


def _inside(path: str, folder: str) -> bool:
    return PurePath(path).is_relative_to(PurePath(folder))


def _free_name(destination: str, name: str, taken: Callable[[str], bool],
               used: set[str]) -> str:
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, suffix = name, ""
    candidate, n = str(PurePath(destination) / name), 1
    while candidate in used or taken(candidate):
        n += 1
        candidate = str(PurePath(destination) / (f"{stem}-{n}.{suffix}" if suffix
                                                 else f"{stem}-{n}"))
    used.add(candidate)
    return candidate


def _depth(path: str, parents: Mapping[str, tuple[str, str]]) -> int:
    depth, seen = 0, {path}
    while (link := parents.get(path)) is not None and link[0] not in seen:
        path = link[0]
        seen.add(path)
        depth += 1
    return depth


def plan_move(disks: Iterable[DiskFiles], *, destination: str,
              parents: Mapping[str, tuple[str, str]],
              children: Mapping[str, Iterable[str]],
              vm_files: Iterable[str], attached_elsewhere: Iterable[str],
              images_dir: str, include_checkpoints: bool = True,
              live_read_only: bool = False,
              taken: Callable[[str], bool] = lambda path: False) -> MovePlan:
    """The plan (see the module doc). ``parents``: file -> (parent, parent format), as
    the files' headers name them; ``children``: file -> every file naming it as parent
    (the whole host's, as far as known)."""
    ours, others = set(vm_files), set(attached_elsewhere)
    skipped: dict[str, str] = {}
    owner: dict[str, DiskFiles] = {}

    def why_not(path: str) -> str | None:
        if _inside(path, images_dir):
            return "a managed image (shared by the VMs made from it)"
        if _inside(path, destination):
            return "already in the destination"
        if path in others:
            return "attached to another VM"
        return None

    for disk in disks:
        if disk.read_only and live_read_only:
            skipped[disk.active] = "a read-only disk of a running VM moves when it is off"
            continue
        seeds = [disk.active, *(disk.checkpoint_files if include_checkpoints else ())]
        for path in seeds:
            while path not in owner:
                if path != disk.active and path not in ours:
                    skipped[path] = why_not(path) or "a parent the VM shares (not its own)"
                    break
                owner[path] = disk
                if path not in parents:
                    break
                if not include_checkpoints:
                    skipped[parents[path][0]] = "checkpoint files stay where they are"
                    break
                path = parents[path][0]

    moving = set()
    for path in owner:
        if (reason := why_not(path)) is None:
            moving.add(path)
        else:
            skipped[path] = reason
    changed = True
    while changed:
        changed = False
        for path in sorted(moving):
            staying = [c for c in children.get(path, ()) if c not in moving]
            if staying:
                moving.discard(path)
                skipped[path] = f"the parent of '{staying[0]}', which does not move"
                changed = True

    used: set[str] = set()
    new_of: dict[str, str] = {}
    for path in sorted(moving, key=lambda p: (_depth(p, parents), p)):
        new_of[path] = _free_name(destination, PurePath(path).name, taken, used)
    moves = []
    for path in sorted(moving, key=lambda p: (_depth(p, parents), p)):
        disk = owner[path]
        link = parents.get(path)
        parent, parent_format = link if link is not None else (None, None)
        moves.append(FileMove(
            disk.disk_id, path, new_of[path], disk.format if path == disk.active else
            _format_of(path, parents, disk.format),
            parent, new_of.get(parent, parent) if parent is not None else None,
            parent_format, path == disk.active))
    return MovePlan(tuple(moves), tuple(sorted(skipped.items())))


def _format_of(path: str, parents: Mapping[str, tuple[str, str]], fallback: str) -> str:
    """A parent's format as its child's header records it (hvstack writes it always)."""
    for parent, fmt in parents.values():
        if parent == path:
            return fmt
    return fallback
