"""The checkpoint tree: adding, naming, applying, forgetting and renaming files; its JSON."""

from __future__ import annotations

import pytest

from hvstack.checkpoints.model import (
    Checkpoint,
    CheckpointKind,
    CheckpointTree,
    PendingMerge,
    check_limit,
    check_type_allows,
    default_name,
)
from hvstack.errors import AlreadyExists, Conflict, InvalidInput, NotFound


def checkpoint(cid: str, name: str, disk: str) -> Checkpoint:
    return Checkpoint(cid, name, None, 1.0, CheckpointKind.PRODUCTION, {"d1": disk})


def chain() -> CheckpointTree:
    """c1 <- c2 <- Now, then c1 applied and c3 taken: c1 has two branches."""
    tree = CheckpointTree().added(checkpoint("c1", "one", "/s/a.qcow2"), ["/s/a_1.qcow2"])
    tree = tree.added(checkpoint("c2", "two", "/s/a_1.qcow2"), ["/s/a_2.qcow2"])
    tree = tree.applied("one", ["/s/a_3.qcow2"])
    return tree.added(checkpoint("c3", "three", "/s/a_3.qcow2"), ["/s/a_4.qcow2"])


def test_a_new_checkpoint_hangs_under_the_current_position_and_becomes_it() -> None:
    tree = chain()
    assert [c.parent for c in tree.checkpoints] == [None, "c1", "c1"]
    assert tree.current == "c3"
    assert {c.id for c in tree.children("c1")} == {"c2", "c3"}
    assert [c.id for c in tree.ancestors("c3")] == ["c3", "c1"]
    assert [c.id for c in tree.subtree("c1")] == ["c1", "c2", "c3"]
    assert "/s/a_4.qcow2" in tree.made and "/s/a.qcow2" not in tree.made


def test_references_are_ids_first_then_names() -> None:
    tree = chain()
    assert tree.get("c2").name == "two"
    assert tree.get("two").id == "c2"
    with pytest.raises(NotFound):
        tree.get("four")


def test_names_are_unique_and_follow_the_name_rules() -> None:
    tree = chain()
    with pytest.raises(AlreadyExists):
        tree.added(checkpoint("c4", "two", "/s/x"))
    with pytest.raises(AlreadyExists):
        tree.renamed("c3", "one")
    with pytest.raises(InvalidInput):
        tree.renamed("c3", "bad/name")
    assert tree.renamed("c3", "three") is tree
    assert tree.renamed("c3", "drei").get("c3").name == "drei"


def test_forgetting_a_checkpoint_hangs_its_children_and_now_under_its_parent() -> None:
    tree = chain().without(["c1"])
    assert [(c.id, c.parent) for c in tree.checkpoints] == [("c2", None), ("c3", None)]
    tree = chain().without(["c3"])
    assert tree.current == "c1"
    tree = chain().without(["c1", "c2", "c3"])
    assert tree.current is None and not tree.checkpoints


def test_renamed_files_follow_everywhere() -> None:
    tree = chain().with_files({"/s/a_1.qcow2": "/t/a_1.qcow2", "/s/a_4.qcow2": "/t/a_4.qcow2"})
    assert tree.get("c2").disks == {"d1": "/t/a_1.qcow2"}
    assert "/t/a_4.qcow2" in tree.made and "/s/a_4.qcow2" not in tree.made


def test_json_round_trip_keeps_everything() -> None:
    tree = chain().with_pending(PendingMerge(("c2",), ({"op": "commit", "top": "x"},), "j1"))
    assert CheckpointTree.from_json(tree.to_json()) == tree


def test_the_limit_and_a_disabled_type_refuse_with_a_reason() -> None:
    check_limit(chain(), 4)
    with pytest.raises(Conflict, match="limit"):
        check_limit(chain(), 3)
    check_type_allows("production")
    with pytest.raises(Conflict, match="disabled"):
        check_type_allows("disabled")


def test_default_names_are_hyper_v_s() -> None:
    assert default_name("web", 0.0).startswith("web - (")
    assert default_name("web", 0.0, automatic=True).startswith("Automatic Checkpoint - web - (")
