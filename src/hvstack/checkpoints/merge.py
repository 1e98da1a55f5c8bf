"""What becomes of a VM's disk files once checkpoints are deleted: a pure plan.

Deleting checkpoints only takes them out of the tree (``CheckpointTree.without``); the
files they named stay until this plan has garbage-collected them. A file is a
*candidate* if the VM made it (``tree.made``) or a deleted checkpoint named it as the
user attached it (``tree.bases``), and neither a checkpoint nor the current state
(the VM's disk paths) names it. For each candidate F, by the files whose header names
it as backing (its *children*):

* no child: :class:`Remove` F if the VM made it (a disk the user attached is kept);
* exactly one child X: :class:`Commit` X into F. F then holds what X held and takes X's
  place everywhere (the checkpoints and the current disk that named X name F); X's own
  children are rebased onto F (``qemu-img rebase -u``: F holds X's view now), and X is
  deleted. Only F is written, and nothing but X needed F as it was;
* two or more: F stays as the shared base of its branches (no data copied) until a
  later deletion leaves it one child.

Each step can free another (a removed leaf leaves its parent one child), so
:func:`plan` repeats until nothing is left to do and returns the steps in order. A
child that is not the VM's own (someone made a differencing disk on a checkpoint's
file) makes the plan refuse with :class:`~hvstack.errors.ResourceBusy` when a step
would write into its parent or delete it.

The executor (:mod:`hvstack.host.checkpoint_merge`) carries out one step at a time,
applies it to the tree and the disk paths with :func:`after_step` (stored before X is
deleted), then plans again from the headers on disk: a step cut short by a crash is
simply planned again. Steps are stored in ``PendingMerge.steps`` as
:func:`step_to_json` encodes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hvstack.checkpoints.model import CheckpointTree
from hvstack.errors import InvalidInput, ResourceBusy


@dataclass(frozen=True)
class Link:
    """What a qcow2 header says of its parent: the path and its format."""

    parent: str
    format: str


@dataclass(frozen=True)
class Remove:
    """Delete ``file``: the VM made it, nothing names it, nothing is built on it."""

    file: str


@dataclass(frozen=True)
class Commit:
    """Write ``file`` (X) into its parent ``into`` (F, of format ``into_format``);
    ``children``: X's children, rebased onto F; ``disk``: the disk whose current file
    X is (its path becomes F), or None."""

    file: str
    into: str
    into_format: str
    children: tuple[str, ...] = ()
    disk: str | None = None


Step = Remove | Commit


@dataclass(frozen=True)
class Files:
    """The VM's disk files as the plan sees them: ``current`` each disk's path by disk
    id and ``formats`` the format recorded for it; ``links`` child -> parent of every
    existing qcow2 file read (the VM's and any other under the storage roots);
    ``existing`` the VM's files that exist."""

    current: Mapping[str, str]
    formats: Mapping[str, str]
    links: Mapping[str, Link]
    existing: frozenset[str]


def deleted(tree: CheckpointTree, ids: Iterable[str]) -> CheckpointTree:
    """``tree`` without the checkpoints ``ids``; the files they named that the VM did
    not make become ``bases`` (what the deletion stores before any file changes)."""
    ids = tuple(ids)
    named = {p for i in ids for p in tree.get(i).disks.values()}
    return replace(tree.without(ids), bases=tree.bases | (named - tree.made))


def candidates(tree: CheckpointTree, current: Mapping[str, str]) -> frozenset[str]:
    """The files a merge may change: made or bases, named by nothing."""
    named = tree.referenced_files() | frozenset(current.values())
    return (tree.made | tree.bases) - named


def _own(tree: CheckpointTree, current: Mapping[str, str]) -> frozenset[str]:
    return tree.referenced_files() | frozenset(current.values()) | tree.made | tree.bases


def _children(links: Mapping[str, Link], path: str) -> list[str]:
    return sorted(child for child, link in links.items() if link.parent == path)


def _refuse(path: str, foreign: list[str]) -> ResourceBusy:
    shown = ", ".join(f"'{f}'" for f in foreign[:3])
    return ResourceBusy(
        f"cannot merge the checkpoint files: '{path}' is the parent of {shown}, which is not "
        "one of this VM's disks; delete or flatten that disk first", disk=path,
        children=foreign)


def next_step(tree: CheckpointTree, files: Files) -> Step | None:
    """The first thing to do, or None when nothing is left (see the module doc)."""
    own = _own(tree, files.current)
    for path in sorted(candidates(tree, files.current)):
        if path not in files.existing:
            continue  # forgotten by after_forgotten, not a file operation
        children = _children(files.links, path)
        foreign = [c for c in children if c not in own]
        if len(children) - len(foreign) > 1:
            continue  # the shared base of branches; a foreign child changes nothing
        if foreign:
            raise _refuse(path, foreign)
        if not children:
            if path in tree.made:
                return Remove(path)
            continue
        child = children[0]
        grandchildren = _children(files.links, child)
        strangers = [c for c in grandchildren if c not in own]
        if strangers:
            raise _refuse(child, strangers)
        disk = next((d for d, p in files.current.items() if p == child), None)
        return Commit(child, path, files.links[child].format, tuple(grandchildren), disk)
    return None


def forgotten(tree: CheckpointTree, files: Files) -> CheckpointTree:
    """``tree`` without the candidates that no longer exist (deleted by an earlier run
    that stopped before it stored so)."""
    gone = candidates(tree, files.current) - files.existing
    if not gone:
        return tree
    return replace(tree, made=tree.made - gone, bases=tree.bases - gone)


def after_step(tree: CheckpointTree, files: Files, step: Step) -> tuple[CheckpointTree, Files]:
    """The tree and the files once ``step`` is done."""
    if isinstance(step, Remove):
        links = {c: link for c, link in files.links.items() if c != step.file}
        return (replace(tree, made=tree.made - {step.file}),
                replace(files, links=links, existing=files.existing - {step.file}))
    moved = {c: Link(step.into, step.into_format) if c in step.children else link
             for c, link in files.links.items() if c != step.file}
    current = {d: step.into if p == step.file else p for d, p in files.current.items()}
    formats = {d: step.into_format if files.current[d] == step.file else f
               for d, f in files.formats.items()}
    checkpoints = tuple(
        replace(c, disks={d: step.into if p == step.file else p for d, p in c.disks.items()})
        for c in tree.checkpoints)
    # F takes X's place: named again (a later deletion makes it a base again), or a
    # shared base as X was.
    named = step.file in tree.referenced_files() or step.file in files.current.values()
    bases = tree.bases - {step.file} - ({step.into} if named else set())
    return (replace(tree, checkpoints=checkpoints, made=tree.made - {step.file},
                    bases=bases),
            Files(current, formats, moved, files.existing - {step.file}))


def plan(tree: CheckpointTree, files: Files) -> list[Step]:
    """Every step, in order, until nothing is left to do."""
    steps: list[Step] = []
    tree = forgotten(tree, files)
    while (step := next_step(tree, files)) is not None:
        steps.append(step)
        tree, files = after_step(tree, files, step)
    return steps


# -- storing steps in PendingMerge.steps -------------------------------------------------


def step_to_json(step: Step) -> dict[str, Any]:
    if isinstance(step, Remove):
        return {"op": "remove", "file": step.file}
    return {"op": "commit", "file": step.file, "into": step.into,
            "into_format": step.into_format, "children": list(step.children),
            "disk": step.disk}


def step_from_json(raw: Mapping[str, Any]) -> Step:
    if raw.get("op") == "remove":
        return Remove(str(raw["file"]))
    if raw.get("op") == "commit":
        return Commit(str(raw["file"]), str(raw["into"]), str(raw["into_format"]),
                      tuple(str(c) for c in raw.get("children", ())), raw.get("disk"))
    raise InvalidInput(f"unknown merge step {raw.get('op')!r}")
