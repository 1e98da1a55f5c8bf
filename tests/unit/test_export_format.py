"""The export's record: names from vm.json never leave the folder, disk names are
unique, the record round-trips, and another format or version is refused."""

from __future__ import annotations

import json

import pytest

from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree
from hvstack.compute.model import DiskAttachment, DiskBus, VmConfig
from hvstack.errors import InvalidInput
from hvstack.host.export_format import (
    ExportedFile,
    Manifest,
    disk_names,
    relative_name,
    relocated,
)


@pytest.mark.parametrize("name", ["/etc/shadow", "../x.qcow2", "a/../../x.qcow2", "a//b",
                                  "./a", "a\\b", "a\x1bb", ""])
def test_names_that_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        relative_name(name)


def test_plain_names_are_kept() -> None:
    assert str(relative_name("Virtual Hard Disks/disk0.qcow2")) == \
        "Virtual Hard Disks/disk0.qcow2"


def test_disk_names_are_unique_case_blind() -> None:
    names = disk_names(["/a/disk0.qcow2", "/b/disk0.qcow2", "/c/DISK0.qcow2", "/d/x.raw"])
    assert names == {"/a/disk0.qcow2": "Virtual Hard Disks/disk0.qcow2",
                     "/b/disk0.qcow2": "Virtual Hard Disks/disk0-2.qcow2",
                     "/c/DISK0.qcow2": "Virtual Hard Disks/DISK0-3.qcow2",
                     "/d/x.raw": "Virtual Hard Disks/x.raw"}


def _manifest() -> Manifest:
    disk = DiskAttachment("Virtual Hard Disks/d_1.qcow2", DiskBus.IDE, id="d")
    config = VmConfig("web", disks=(disk,))
    frozen = VmConfig("web", disks=(DiskAttachment("Virtual Hard Disks/d.qcow2",
                                                   DiskBus.IDE, id="d"),))
    tree = CheckpointTree().added(
        Checkpoint("c1", "one", None, 1.0, CheckpointKind.STANDARD,
                   {"d": "Virtual Hard Disks/d.qcow2"}, frozen.to_json(),
                   memory_state="Snapshots/c1.vmstate"), ["Virtual Hard Disks/d_1.qcow2"])
    files = (ExportedFile("Virtual Hard Disks/d.qcow2", "qcow2"),
             ExportedFile("Virtual Hard Disks/d_1.qcow2", "qcow2",
                          "Virtual Hard Disks/d.qcow2", "qcow2"))
    return Manifest("4b0e3c9e-9a0e-4c55-9d5c-4f8f0b1e2a3d", config, files, tree)


def test_the_record_round_trips() -> None:
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("change", [{"format": "something"}, {"version": 2},
                                    {"files": [{"path": "a.qcow2", "format": "qed"}]},
                                    {"state": "Running"}, {"config": 3}])
def test_another_format_version_or_a_broken_record_is_refused(change: dict[str, object]
                                                               ) -> None:
    raw = json.loads(_manifest().to_json()) | change
    with pytest.raises(InvalidInput):
        Manifest.from_json(json.dumps(raw))


def test_relocated_renames_files_settings_and_states() -> None:
    tree = _manifest().tree
    moved = relocated(tree, lambda p: "/x/" + p.split("/")[-1], lambda p: "/s/" + p)
    [checkpoint] = moved.checkpoints
    assert checkpoint.disks == {"d": "/x/d.qcow2"}
    assert VmConfig.from_json(checkpoint.config).disks[0].path == "/x/d.qcow2"
    assert checkpoint.memory_state == "/s/Snapshots/c1.vmstate"
    assert moved.made == frozenset({"/x/d_1.qcow2"})
