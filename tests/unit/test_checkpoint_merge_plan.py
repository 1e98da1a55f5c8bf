"""The merge plan of checkpoint deletion, with worked examples (no I/O).

The VM has one disk "d" attached as D (the user's file). Each checkpoint froze the
disk's file of that moment and put an overlay O<n> (made by the VM) on top of it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from hvstack.checkpoints import merge
from hvstack.checkpoints.merge import (
    Commit,
    Files,
    Link,
    Remove,
    after_step,
    plan,
    step_from_json,
    step_to_json,
)
from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree
from hvstack.errors import ResourceBusy

D, O1, O2, O3, O4 = "/s/D.qcow2", "/s/D_1.qcow2", "/s/D_2.qcow2", "/s/D_3.qcow2", "/s/D_4.qcow2"


def cp(name: str, parent: str | None, file: str) -> Checkpoint:
    return Checkpoint(name, name, parent, 0.0, CheckpointKind.PRODUCTION, {"d": file})


def files(current: str, links: dict[str, str], fmt: str = "qcow2",
          base_format: str = "qcow2") -> Files:
    existing = frozenset({*links, *links.values(), current})
    return Files({"d": current}, {"d": fmt},
                 {c: Link(p, base_format if p == D else "qcow2") for c, p in links.items()},
                 existing)


def deleted(tree: CheckpointTree, *ids: str) -> CheckpointTree:
    return merge.deleted(tree, ids)


# cp1 (D) -> cp2 (O1) -> cp3 (O2) -> Now (O3)
LINEAR = CheckpointTree((cp("cp1", None, D), cp("cp2", "cp1", O1), cp("cp3", "cp2", O2)),
                        current="cp3", made=frozenset({O1, O2, O3}))
LINEAR_FILES = files(O3, {O1: D, O2: O1, O3: O2})


def test_a_middle_checkpoint_merges_its_child_into_its_file() -> None:
    tree = deleted(LINEAR, "cp2")
    assert plan(tree, LINEAR_FILES) == [Commit(O2, O1, "qcow2", (O3,), None)]
    after, left = after_step(tree, LINEAR_FILES, plan(tree, LINEAR_FILES)[0])
    assert after.get("cp3").disks == {"d": O1}  # cp3 now names O1, which holds O2's data
    assert after.made == {O1, O3}
    assert left.links[O3] == Link(O1, "qcow2")
    assert left.current == {"d": O3}
    assert plan(after, left) == []


def test_the_first_checkpoint_merges_into_the_users_disk_which_is_never_deleted() -> None:
    tree = deleted(LINEAR, "cp1")
    assert tree.bases == {D}
    assert plan(tree, files(O3, {O1: D, O2: O1, O3: O2}, base_format="raw")) == [
        Commit(O1, D, "raw", (O2,), None)]


def test_the_newest_checkpoint_merges_the_current_file_down_and_the_disk_follows() -> None:
    tree = deleted(LINEAR, "cp3")
    [step] = plan(tree, LINEAR_FILES)
    assert step == Commit(O3, O2, "qcow2", (), "d")
    after, left = after_step(tree, LINEAR_FILES, step)
    assert left.current == {"d": O2}
    assert left.formats == {"d": "qcow2"}
    assert after.made == {O1, O2}


def test_the_whole_tree_deleted_flattens_into_the_users_disk_of_its_format() -> None:
    tree = deleted(LINEAR, "cp1", "cp2", "cp3")
    disk = files(O3, {O1: D, O2: O1, O3: O2}, base_format="raw")
    steps = plan(tree, disk)
    assert steps == [Commit(O1, D, "raw", (O2,), None), Commit(O2, D, "raw", (O3,), None),
                     Commit(O3, D, "raw", (), "d")]
    for step in steps:
        tree, disk = after_step(tree, disk, step)
    assert disk.current == {"d": D} and disk.formats == {"d": "raw"}
    assert tree.made == frozenset() and tree.checkpoints == () and tree.bases == frozenset()


# cp1 (D) -> cp2 (O1) ; Now (O3) on cp1 after applying it (O2, the old Now, deleted)
BRANCHED = CheckpointTree((cp("cp1", None, D), cp("cp2", "cp1", O1)), current="cp1",
                          made=frozenset({O1, O3}))
BRANCHED_FILES = files(O3, {O1: D, O3: D})


def test_a_base_of_two_branches_stays_until_one_branch_goes() -> None:
    tree = deleted(BRANCHED, "cp1")
    assert plan(tree, BRANCHED_FILES) == []  # D holds both branches: nothing copied
    tree = deleted(tree, "cp2")
    # O1 had nothing on it: deleted; then D has one child left, the current file
    assert plan(tree, BRANCHED_FILES) == [Remove(O1), Commit(O3, D, "qcow2", (), "d")]


def test_a_leaf_the_vm_made_is_deleted_and_a_user_file_is_kept() -> None:
    tree = deleted(BRANCHED, "cp2")
    assert plan(tree, BRANCHED_FILES) == [Remove(O1)]
    lone = replace(CheckpointTree(), bases=frozenset({D}))
    assert plan(lone, files(O3, {})) == []


def test_a_file_already_gone_is_forgotten_not_planned() -> None:
    tree = deleted(BRANCHED, "cp2")
    gone = replace(BRANCHED_FILES, existing=BRANCHED_FILES.existing - {O1},
                   links={O3: Link(D, "qcow2")})
    assert plan(tree, gone) == []


def test_a_foreign_child_of_a_file_to_merge_into_is_refused() -> None:
    tree = deleted(LINEAR, "cp2")
    foreign = "/s/someone-else.qcow2"
    links = {**LINEAR_FILES.links, foreign: Link(O1, "qcow2")}
    with pytest.raises(ResourceBusy) as caught:
        plan(tree, replace(LINEAR_FILES, links=links))
    assert foreign in caught.value.message
    # ... also on the file merged away (its children would be rebased)
    links = {**LINEAR_FILES.links, foreign: Link(O2, "qcow2")}
    with pytest.raises(ResourceBusy):
        plan(tree, replace(LINEAR_FILES, links=links))


def test_a_foreign_child_of_a_shared_base_changes_nothing() -> None:
    tree = deleted(BRANCHED, "cp1")
    links = {**BRANCHED_FILES.links, "/s/other.qcow2": Link(D, "qcow2")}
    assert plan(tree, replace(BRANCHED_FILES, links=links)) == []


def test_a_subtree_with_the_current_state_below_it() -> None:
    # cp1 (D) -> cp2 (O1) -> cp3 (O2) -> Now (O3); delete cp2 and cp3
    tree = deleted(LINEAR, *(c.id for c in LINEAR.subtree("cp2")))
    assert tree.current == "cp1"
    steps = plan(tree, LINEAR_FILES)
    assert steps == [Commit(O2, O1, "qcow2", (O3,), None), Commit(O3, O1, "qcow2", (), "d")]


def test_steps_survive_json() -> None:
    for step in (Remove(O1), Commit(O2, O1, "raw", (O3, O4), "d"), Commit(O2, O1, "qcow2")):
        assert step_from_json(step_to_json(step)) == step


def test_bases_follow_the_files_when_a_tree_is_relocated() -> None:
    from hvstack.host.export_format import relocated

    tree = deleted(BRANCHED, "cp1")  # D: a shared base no checkpoint names
    moved = {D: "/t/D.qcow2", O1: "/t/D_1.qcow2", O3: "/t/D_3.qcow2"}
    assert relocated(tree, moved.__getitem__, str).bases == {"/t/D.qcow2"}
    assert tree.with_files(moved).bases == {"/t/D.qcow2"}
