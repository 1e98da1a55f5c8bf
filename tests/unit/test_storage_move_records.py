"""The records a storage move changes: the tree and settings renamed together, and the
pending move as stored for a restart."""

from __future__ import annotations

from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree
from hvstack.compute.model import DiskAttachment, DiskBus, VmConfig
from hvstack.host.storage_move import PendingMove, renamed_config, renamed_tree
from hvstack.storage.move_plan import FileMove

RENAMES = {"/a/d.qcow2": "/b/d.qcow2", "/a/d_1.qcow2": "/b/d_1.qcow2"}


def config(path: str) -> VmConfig:
    return VmConfig(name="web", disks=(DiskAttachment(path, DiskBus.IDE, id="d1"),
                                       DiskAttachment("/img/x.raw", DiskBus.IDE, "raw",
                                                      id="d2")))


def test_the_tree_and_the_settings_name_the_new_files() -> None:
    checkpoint = Checkpoint("c1", "one", None, 0.0, CheckpointKind.STANDARD,
                            {"d1": "/a/d.qcow2"}, config("/a/d.qcow2").to_json(),
                            memory_state="/vm/checkpoints/c1.vmstate")
    tree = CheckpointTree().added(checkpoint, made=["/a/d_1.qcow2"])
    moved = renamed_tree(tree, RENAMES)
    [after] = moved.checkpoints
    assert dict(after.disks) == {"d1": "/b/d.qcow2"}
    assert after.memory_state == "/vm/checkpoints/c1.vmstate"
    assert [d.path for d in VmConfig.from_json(after.config).disks] == ["/b/d.qcow2",
                                                                          "/img/x.raw"]
    assert moved.made == {"/b/d_1.qcow2"} and moved.current == "c1"
    assert [d.path for d in renamed_config(config("/a/d_1.qcow2"), RENAMES).disks] == [
        "/b/d_1.qcow2", "/img/x.raw"]


def test_a_pending_move_survives_its_json() -> None:
    pending = PendingMove("vm", "job", True, "switching", (
        FileMove("d1", "/a/d.qcow2", "/b/d.qcow2", "qcow2", "/img/t.qcow2", "/img/t.qcow2",
                 "qcow2", False),
        FileMove("d1", "/a/d_1.qcow2", "/b/d_1.qcow2", "qcow2", "/a/d.qcow2", "/b/d.qcow2",
                 "qcow2", True)), "/b")
    assert PendingMove.from_json(pending.to_json()) == pending
