"""A VM's checkpoint tree: pure, frozen data and the rules that keep it whole.

How disks become checkpoints: creating a checkpoint freezes each writable disk's
current file (its *active* file) and puts a new, empty qcow2 overlay on top of it,
which becomes the disk's active file (the VM's settings name it from then on). The
frozen file is the checkpoint's record of that disk and is never written again while
a checkpoint, another file or the VM's current state needs it as it is. Applying a
checkpoint puts a new empty overlay on top of the checkpoint's files (the files of the
state left behind are deleted unless something still needs them); so branches share
their common files and each stays whole.

* :class:`Checkpoint`: id, unique name (within the VM), parent checkpoint, kind
  (production: disks only; standard: disks plus the memory and device state in
  ``memory_state`` with the adapters' layout in ``layout``), each disk's frozen file by
  disk id, the VM's settings at that moment (``config``, VmConfig JSON) and a copy of
  its UEFI variables (``efi_vars``).
* :class:`CheckpointTree`: every checkpoint of one VM, oldest first; ``current`` is the
  checkpoint the VM's current state ("Now") follows (None: no checkpoint before it);
  ``made`` the files the checkpoints made (overlays), the only ones a merge may delete
  (a disk the user attached stays, also as a checkpoint's file); ``pending`` a merge
  that a restart must finish (see :mod:`hvstack.checkpoints.merge`); ``bases`` the
  files a deleted checkpoint named that the VM did not make (a disk as the user attached
  it): never deleted, but a merge may still write into them once they have one child.

Kept in the store under ``checkpoints/<vm id>`` (see :mod:`hvstack.host.records`),
changed in the same transaction as the VM's settings when disk paths change.
"""

from __future__ import annotations

import enum
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hvstack.compute.model import validate_name
from hvstack.errors import AlreadyExists, Conflict, NotFound

MAX_CHECKPOINT_NAME = 100
MEMORY_STATE_SUFFIX = ".vmstate"


class CheckpointKind(enum.StrEnum):
    PRODUCTION = "production"  # disks only: the VM boots fresh from it (Off)
    STANDARD = "standard"  # disks + memory and device state: it resumes (Saved)


def new_checkpoint_id() -> str:
    return secrets.token_hex(8)


def _no_disks() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class Checkpoint:
    id: str
    name: str
    parent: str | None
    created_at: float
    kind: CheckpointKind
    disks: Mapping[str, str] = field(default_factory=_no_disks)  # disk id -> frozen file
    config: str = ""  # the VM's settings (VmConfig JSON) at that moment
    memory_state: str | None = None  # standard: the saved memory and device state
    layout: str | None = None  # standard: where the adapters sat (compute.nics)
    efi_vars: str | None = None  # a copy of the UEFI variables (Generation 2)
    automatic: bool = False  # made by the VM's start (automatic checkpoints)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "parent": self.parent,
                "created_at": self.created_at, "kind": self.kind.value,
                "disks": dict(self.disks), "config": self.config,
                "memory_state": self.memory_state, "layout": self.layout,
                "efi_vars": self.efi_vars, "automatic": self.automatic}

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> Checkpoint:
        return Checkpoint(str(raw["id"]), str(raw["name"]), raw.get("parent"),
                          float(raw["created_at"]), CheckpointKind(raw["kind"]),
                          dict(raw.get("disks", {})), str(raw.get("config", "")),
                          raw.get("memory_state"), raw.get("layout"), raw.get("efi_vars"),
                          bool(raw.get("automatic", False)))


@dataclass(frozen=True)
class PendingMerge:
    """A deletion whose files are being merged: what a restart must finish.

    ``deleted``: the ids of the checkpoints already gone from the tree; ``steps``: the
    merge plan's steps still to do, as :mod:`hvstack.checkpoints.merge` encodes them;
    ``job``: the id of the host job doing it.
    """

    deleted: tuple[str, ...]
    steps: tuple[Mapping[str, Any], ...] = ()
    job: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"deleted": list(self.deleted), "steps": [dict(s) for s in self.steps],
                "job": self.job}

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> PendingMerge:
        return PendingMerge(tuple(raw.get("deleted", ())),
                            tuple(dict(s) for s in raw.get("steps", ())),
                            str(raw.get("job", "")))


def validate_checkpoint_name(name: str) -> str:
    """The rules of VM names (no separators, control characters or outer blanks)."""
    return validate_name(name, what="checkpoint name")


def default_name(vm_name: str, when: float, *, automatic: bool = False) -> str:
    """Hyper-V's names: "VM - (2026-12-02 - 10:15:00)", "Automatic Checkpoint - VM - (...)"."""
    stamp = time.strftime("%Y-%m-%d - %H:%M:%S", time.localtime(when))
    name = f"{vm_name} - ({stamp})"
    return f"Automatic Checkpoint - {name}" if automatic else name


@dataclass(frozen=True)
class CheckpointTree:
    checkpoints: tuple[Checkpoint, ...] = ()
    current: str | None = None
    made: frozenset[str] = frozenset()
    pending: PendingMerge | None = None
    bases: frozenset[str] = frozenset()

    # -- reading ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.checkpoints)

    def get(self, ref: str) -> Checkpoint:
        """A checkpoint by id, else by name; NotFound saying which VM otherwise."""
        for checkpoint in self.checkpoints:
            if checkpoint.id == ref:
                return checkpoint
        for checkpoint in self.checkpoints:
            if checkpoint.name == ref:
                return checkpoint
        raise NotFound(f"checkpoint '{ref}' does not exist", checkpoint=ref)

    def find(self, checkpoint_id: str | None) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.id == checkpoint_id), None)

    def children(self, checkpoint_id: str | None) -> tuple[Checkpoint, ...]:
        """The checkpoints whose parent is ``checkpoint_id`` (None: the roots)."""
        return tuple(c for c in self.checkpoints if c.parent == checkpoint_id)

    def subtree(self, checkpoint_id: str) -> tuple[Checkpoint, ...]:
        """The checkpoint and all its descendants, parents before children."""
        found = [self.get(checkpoint_id)]
        for checkpoint in found:
            found.extend(self.children(checkpoint.id))
        return tuple(found)

    def ancestors(self, checkpoint_id: str | None) -> tuple[Checkpoint, ...]:
        """The checkpoint and its parents up to the root, nearest first."""
        found: list[Checkpoint] = []
        node = self.find(checkpoint_id)
        while node is not None:
            found.append(node)
            node = self.find(node.parent)
        return tuple(found)

    def referenced_files(self) -> frozenset[str]:
        """Every disk file a checkpoint names."""
        return frozenset(path for c in self.checkpoints for path in c.disks.values())

    # -- changing (each returns a new tree) ---------------------------------------

    def check_new_name(self, name: str) -> None:
        validate_checkpoint_name(name)
        if any(c.name == name for c in self.checkpoints):
            raise AlreadyExists(f"a checkpoint named '{name}' already exists", checkpoint=name)

    def added(self, checkpoint: Checkpoint, made: Iterable[str] = ()) -> CheckpointTree:
        """``checkpoint`` added under the current position, which then follows it;
        ``made``: the overlays made for it."""
        self.check_new_name(checkpoint.name)
        checkpoint = replace(checkpoint, parent=self.current)
        return replace(self, checkpoints=(*self.checkpoints, checkpoint),
                       current=checkpoint.id, made=self.made | frozenset(made))

    def renamed(self, ref: str, name: str) -> CheckpointTree:
        checkpoint = self.get(ref)
        if checkpoint.name == name:
            return self
        self.check_new_name(name)
        return self._replaced(replace(checkpoint, name=name))

    def applied(self, ref: str, made: Iterable[str] = ()) -> CheckpointTree:
        """The current state follows checkpoint ``ref`` now."""
        return replace(self, current=self.get(ref).id, made=self.made | frozenset(made))

    def without(self, ids: Iterable[str]) -> CheckpointTree:
        """The checkpoints ``ids`` gone; their children hang under their nearest parent
        that stays, and so does the current state. Files are not touched (a merge
        plan decides what becomes of them)."""
        gone = set(ids)

        def kept_parent(parent: str | None) -> str | None:
            while parent is not None and parent in gone:
                node = self.find(parent)
                parent = node.parent if node is not None else None
            return parent

        return replace(self,
                       checkpoints=tuple(replace(c, parent=kept_parent(c.parent))
                                         for c in self.checkpoints if c.id not in gone),
                       current=kept_parent(self.current))

    def with_files(self, renamed: Mapping[str, str]) -> CheckpointTree:
        """Every file named in ``renamed`` (old path -> new path) renamed: in the
        checkpoints' disks, their memory states and in ``made`` (a merge or a move)."""

        def new(path: str) -> str:
            return renamed.get(path, path)

        return replace(self, checkpoints=tuple(
            replace(c, disks={d: new(p) for d, p in c.disks.items()},
                    memory_state=None if c.memory_state is None else new(c.memory_state),
                    layout=None if c.layout is None else new(c.layout),
                    efi_vars=None if c.efi_vars is None else new(c.efi_vars))
            for c in self.checkpoints), made=frozenset(new(p) for p in self.made),
            bases=frozenset(new(p) for p in self.bases))

    def with_pending(self, pending: PendingMerge | None) -> CheckpointTree:
        return replace(self, pending=pending)

    def _replaced(self, checkpoint: Checkpoint) -> CheckpointTree:
        return replace(self, checkpoints=tuple(checkpoint if c.id == checkpoint.id else c
                                               for c in self.checkpoints))

    # -- storing --------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"checkpoints": [c.to_json() for c in self.checkpoints],
                           "current": self.current, "made": sorted(self.made),
                           "bases": sorted(self.bases),
                           "pending": None if self.pending is None else self.pending.to_json()},
                          sort_keys=True)

    @staticmethod
    def from_json(text: str) -> CheckpointTree:
        raw: dict[str, Any] = json.loads(text)
        pending = raw.get("pending")
        return CheckpointTree(tuple(Checkpoint.from_json(c) for c in raw.get("checkpoints", ())),
                              raw.get("current"), frozenset(raw.get("made", ())),
                              None if pending is None else PendingMerge.from_json(pending),
                              frozenset(raw.get("bases", ())))


def check_limit(tree: CheckpointTree, limit: int) -> None:
    """A new checkpoint is refused (Conflict) once the VM has ``limit`` of them, as in
    Hyper-V; none is ever deleted to make room."""
    if len(tree) >= limit:
        raise Conflict(f"the VM has {len(tree)} checkpoints, its limit; delete one or raise "
                       "the limit (hv vm set NAME --checkpoint-limit N)", limit=limit)


def check_type_allows(checkpoint_type: str) -> None:
    """Conflict for a VM whose checkpoint type is "disabled"."""
    if checkpoint_type == "disabled":
        raise Conflict("checkpoints are disabled for this VM "
                           "(hv vm set NAME --checkpoint-type production to enable them)")
