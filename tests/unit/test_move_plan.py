"""Worked examples of the storage move plan: what moves, what stays and why, where to."""

from __future__ import annotations

from hvstack.storage.move_plan import DiskFiles, plan_move

IMAGES = "/r/images"
DEST = "/s/vm"


def plan(disks: list[DiskFiles], parents: dict[str, tuple[str, str]],
         vm_files: set[str], children: dict[str, list[str]] | None = None, **options: object):
    if children is None:
        children = {}
        for child, (parent, _) in parents.items():
            children.setdefault(parent, []).append(child)
    return plan_move(disks, destination=DEST, parents=parents, children=children,
                     vm_files=vm_files, attached_elsewhere=options.pop("elsewhere", ()),
                     images_dir=IMAGES, **options)  # type: ignore[arg-type]


def test_a_checkpoint_chain_moves_parents_first_and_the_image_stays() -> None:
    # image <- disk0 (checkpoint "a") <- disk0_1 (active)
    parents = {"/r/vm/disk0_1.qcow2": ("/r/vm/disk0.qcow2", "qcow2"),
               "/r/vm/disk0.qcow2": ("/r/images/tiny.qcow2", "qcow2")}
    disk = DiskFiles("d1", "/r/vm/disk0_1.qcow2", "qcow2",
                     checkpoint_files=("/r/vm/disk0.qcow2",))
    result = plan([disk], parents, {"/r/vm/disk0_1.qcow2", "/r/vm/disk0.qcow2"})
    assert [(m.old, m.new, m.backing, m.active) for m in result.moves] == [
        ("/r/vm/disk0.qcow2", "/s/vm/disk0.qcow2", "/r/images/tiny.qcow2", False),
        ("/r/vm/disk0_1.qcow2", "/s/vm/disk0_1.qcow2", "/s/vm/disk0.qcow2", True)]
    assert result.skipped == (("/r/images/tiny.qcow2",
                               "a managed image (shared by the VMs made from it)"),)
    assert result.renames == {"/r/vm/disk0.qcow2": "/s/vm/disk0.qcow2",
                              "/r/vm/disk0_1.qcow2": "/s/vm/disk0_1.qcow2"}


def test_without_checkpoints_only_the_active_file_moves_onto_the_old_parent() -> None:
    parents = {"/r/vm/d_1.qcow2": ("/r/vm/d.qcow2", "raw")}
    disk = DiskFiles("d1", "/r/vm/d_1.qcow2", "qcow2", checkpoint_files=("/r/vm/d.qcow2",))
    result = plan([disk], parents, {"/r/vm/d_1.qcow2", "/r/vm/d.qcow2"},
                  include_checkpoints=False)
    assert [(m.new, m.backing, m.backing_format) for m in result.moves] == [
        ("/s/vm/d_1.qcow2", "/r/vm/d.qcow2", "raw")]
    assert result.skipped == (("/r/vm/d.qcow2", "checkpoint files stay where they are"),)


def test_branches_move_together_and_formats_come_from_the_children() -> None:
    # base.raw <- a (checkpoint) <- active; base.raw <- b (another branch's checkpoint)
    parents = {"/r/a.qcow2": ("/r/base.raw", "raw"), "/r/b.qcow2": ("/r/base.raw", "raw"),
               "/r/act.qcow2": ("/r/a.qcow2", "qcow2")}
    disk = DiskFiles("d1", "/r/act.qcow2", "qcow2",
                     checkpoint_files=("/r/base.raw", "/r/a.qcow2", "/r/b.qcow2"))
    result = plan([disk], parents, {"/r/act.qcow2", "/r/base.raw", "/r/a.qcow2",
                                    "/r/b.qcow2"})
    assert [(m.old, m.format) for m in result.moves] == [
        ("/r/base.raw", "raw"), ("/r/a.qcow2", "qcow2"), ("/r/b.qcow2", "qcow2"),
        ("/r/act.qcow2", "qcow2")]
    assert result.moves[2].backing == "/s/vm/base.raw"


def test_a_parent_with_a_child_outside_the_move_stays_and_so_do_its_parents() -> None:
    parents = {"/r/act.qcow2": ("/r/cp.qcow2", "qcow2"), "/r/cp.qcow2": ("/r/base.qcow2",
                                                                         "qcow2")}
    children = {"/r/cp.qcow2": ["/r/act.qcow2", "/r/someone-elses.qcow2"],
                "/r/base.qcow2": ["/r/cp.qcow2"]}
    disk = DiskFiles("d1", "/r/act.qcow2", "qcow2",
                     checkpoint_files=("/r/cp.qcow2", "/r/base.qcow2"))
    result = plan([disk], parents, {"/r/act.qcow2", "/r/cp.qcow2", "/r/base.qcow2"},
                  children)
    assert [(m.old, m.backing) for m in result.moves] == [("/r/act.qcow2", "/r/cp.qcow2")]
    assert dict(result.skipped) == {
        "/r/cp.qcow2": "the parent of '/r/someone-elses.qcow2', which does not move",
        "/r/base.qcow2": "the parent of '/r/cp.qcow2', which does not move"}


def test_files_in_the_destination_or_of_other_vms_stay() -> None:
    in_dest = DiskFiles("d1", "/s/vm/a.qcow2", "qcow2")
    shared = DiskFiles("d2", "/r/shared.qcow2", "qcow2")
    result = plan([in_dest, shared], {}, {"/s/vm/a.qcow2", "/r/shared.qcow2"},
                  elsewhere=["/r/shared.qcow2"])
    assert result.moves == ()
    assert dict(result.skipped) == {"/s/vm/a.qcow2": "already in the destination",
                                    "/r/shared.qcow2": "attached to another VM"}


def test_a_read_only_disk_of_a_running_vm_stays() -> None:
    disk = DiskFiles("d1", "/r/ro.raw", "raw", read_only=True)
    assert plan([disk], {}, {"/r/ro.raw"}, live_read_only=True).moves == ()
    assert [m.new for m in plan([disk], {}, {"/r/ro.raw"}).moves] == ["/s/vm/ro.raw"]


def test_taken_names_get_a_number() -> None:
    disks = [DiskFiles("d1", "/r/x/disk.qcow2", "qcow2"),
             DiskFiles("d2", "/r/y/disk.qcow2", "qcow2")]
    result = plan(disks, {}, {"/r/x/disk.qcow2", "/r/y/disk.qcow2"},
                  taken=lambda path: path == "/s/vm/disk.qcow2")
    assert sorted(m.new for m in result.moves) == ["/s/vm/disk-2.qcow2", "/s/vm/disk-3.qcow2"]
