"""Pure parts of checkpoints: overlay names, default names, the tree (add, apply,
branches, without), and the CLI's tree drawing with "Now"."""

from __future__ import annotations

import pytest

from hvstack.checkpoints.files import (
    efi_vars_name,
    layout_name,
    memory_state_name,
    overlay_path,
    overlay_stem,
)
from hvstack.checkpoints.model import (
    Checkpoint,
    CheckpointKind,
    CheckpointTree,
    check_limit,
    default_name,
)
from hvstack.cli.checkpoint import tree_lines
from hvstack.errors import AlreadyExists, Conflict, InvalidInput


@pytest.mark.parametrize(("path", "stem"), [
    ("/d/disk.qcow2", "disk"),
    ("/d/disk_1a2b3c4d.qcow2", "disk"),
    ("/d/disk_1a2b3c4d_5e6f7a8b.qcow2", "disk_1a2b3c4d"),  # only the last suffix
    ("/d/disk_XYZ12345.qcow2", "disk_XYZ12345"),  # not hex: the user's name
    ("/d/disk_1a2b3c4.raw", "disk_1a2b3c4"),  # 7 digits: the user's name
    ("/d/web.vhdx", "web"),
])
def test_overlay_stem(path: str, stem: str) -> None:
    assert overlay_stem(path) == stem


def test_overlay_path_is_beside_and_avoids_taken_names() -> None:
    tokens = iter(["00000000", "00000000", "11111111"])
    first = overlay_path("/vms/a/disk.raw", token=lambda: next(tokens))
    assert first == "/vms/a/disk_00000000.qcow2"
    second = overlay_path("/vms/a/disk_00000000.qcow2", taken={first},
                          token=lambda: next(tokens))
    assert second == "/vms/a/disk_11111111.qcow2"


def test_overlay_path_default_token_is_8_hex() -> None:
    path = overlay_path("/x/y.qcow2")
    assert overlay_stem(path) == "y" and len(path) == len("/x/y_12345678.qcow2")


def test_file_names_of_a_checkpoint() -> None:
    assert (memory_state_name("ab"), layout_name("ab"), efi_vars_name("ab")) == (
        "ab.vmstate", "ab.layout", "ab.efivars")


def test_default_names() -> None:
    assert default_name("web", 0).startswith("web - (")
    assert default_name("web", 0, automatic=True).startswith("Automatic Checkpoint - web - (")


def _cp(cid: str, name: str | None = None) -> Checkpoint:
    return Checkpoint(cid, name or cid, None, 1.0, CheckpointKind.PRODUCTION, {"d": f"/{cid}"})


def test_tree_add_apply_and_branch() -> None:
    tree = CheckpointTree().added(_cp("a"), made=["/o1"]).added(_cp("b"), made=["/o2"])
    assert tree.current == "b" and tree.get("b").parent == "a"
    tree = tree.applied("a", made=["/o3"]).added(_cp("c"))
    assert {c.id: c.parent for c in tree.checkpoints} == {"a": None, "b": "a", "c": "a"}
    assert tree.made == {"/o1", "/o2", "/o3"}
    with pytest.raises(AlreadyExists):
        tree.added(_cp("d", "a"))
    with pytest.raises(InvalidInput):
        tree.added(_cp("e", "x/y"))
    assert tree.renamed("a", "first").get("first").id == "a"


def test_limit() -> None:
    tree = CheckpointTree().added(_cp("a"))
    check_limit(tree, 2)
    with pytest.raises(Conflict):
        check_limit(tree, 1)


def _view(tree: CheckpointTree) -> dict[str, object]:
    return {"current": tree.current, "checkpoints": [
        {"id": c.id, "name": c.name, "parent": c.parent, "kind": c.kind.value,
         "automatic": c.automatic, "created_at": c.created_at} for c in tree.checkpoints]}


def _names(lines: list[str]) -> list[str]:
    return [line.split("  (")[0] for line in lines]


def test_tree_lines_put_now_under_the_current_checkpoint() -> None:
    tree = CheckpointTree().added(_cp("a")).added(_cp("b")).applied("a").added(_cp("c"))
    assert _names(tree_lines(_view(tree))) == ["a", "  b", "  c", "    Now"]
    assert _names(tree_lines(_view(tree.applied("b")))) == ["a", "  b", "    Now", "  c"]


def test_tree_lines_without_a_current_checkpoint() -> None:
    tree = CheckpointTree().added(_cp("a")).without(["a"])
    assert _names(tree_lines(_view(tree))) == ["Now"]
    tree = CheckpointTree().added(_cp("a"))
    tree = CheckpointTree(tree.checkpoints, None)
    assert _names(tree_lines(_view(tree))) == ["a", "Now"]


def test_tree_lines_escape_control_characters() -> None:
    tree = CheckpointTree((_cp("a", "x"),), "a")
    view = _view(tree)
    view["checkpoints"][0]["name"] = "x\x1b[31m"  # type: ignore[index]
    assert "\x1b" not in "".join(tree_lines(view))
    assert tree_lines(view)[0].startswith("x\\x1b[31m")
