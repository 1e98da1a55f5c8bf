"""Unit tests for storage path confinement, and the pure parts of the qemu-img runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvstack.errors import (
    HypervisorError,
    InvalidInput,
    NoSpace,
    NotFound,
    PathNotAllowed,
    ResourceBusy,
)
from hvstack.storage.paths import confine
from hvstack.storage.qemu_img import ProgressParser, error_from_stderr, parse_progress


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "vms"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    path.mkdir()
    (path / "secret.img").write_bytes(b"x")
    return path


# -- confine ------------------------------------------------------------------------------


def test_inside_existing_file(root: Path) -> None:
    disk = root / "a.qcow2"
    disk.write_bytes(b"")
    assert confine(str(disk), [root], must_exist=True) == disk.resolve()


def test_inside_new_file_in_new_folder(root: Path) -> None:
    assert confine(root / "new" / "b.qcow2", [root]) == root.resolve() / "new" / "b.qcow2"


def test_root_itself_is_inside(root: Path) -> None:
    assert confine(root, [root], must_exist=True) == root.resolve()


def test_second_root(root: Path, outside: Path) -> None:
    assert confine(outside / "secret.img", [root, outside]) == (outside / "secret.img").resolve()


def test_outside(root: Path, outside: Path) -> None:
    with pytest.raises(PathNotAllowed) as info:
        confine(outside / "secret.img", [root])
    assert str(outside / "secret.img") in str(info.value)
    assert str(root.resolve()) in str(info.value)
    assert info.value.data["roots"] == [str(root.resolve())]


def test_prefix_of_root_name_is_outside(root: Path) -> None:
    sibling = root.parent / (root.name + "2")
    sibling.mkdir()
    with pytest.raises(PathNotAllowed):
        confine(sibling / "a.img", [root])


def test_dotdot_escape(root: Path, outside: Path) -> None:
    with pytest.raises(PathNotAllowed) as info:
        confine(f"{root}/../elsewhere/secret.img", [root])
    assert "through a symbolic link or '..'" in str(info.value)
    assert f"'{root}/../elsewhere/secret.img'" in str(info.value)


def test_where_a_link_leads_outside_is_not_told(root: Path) -> None:
    (root / "fd.img").symlink_to("/proc/self/fd/0")
    with pytest.raises(PathNotAllowed) as info:
        confine(root / "fd.img", [root])
    shown = f"{info.value} {info.value.data}"
    assert "/proc" not in shown
    assert str(root / "fd.img") in shown


def test_dotdot_staying_inside(root: Path) -> None:
    (root / "sub").mkdir()
    assert confine(f"{root}/sub/../a.img", [root]) == root.resolve() / "a.img"


def test_symlinked_file_out_of_root(root: Path, outside: Path) -> None:
    (root / "link.img").symlink_to(outside / "secret.img")
    with pytest.raises(PathNotAllowed):
        confine(root / "link.img", [root], must_exist=True)


def test_dangling_symlink_out_of_root(root: Path, outside: Path) -> None:
    (root / "dangling.img").symlink_to(outside / "not-yet.img")
    with pytest.raises(PathNotAllowed):
        confine(root / "dangling.img", [root])


def test_symlinked_dir_out_of_root(root: Path, outside: Path) -> None:
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowed):
        confine(root / "linkdir" / "secret.img", [root])
    with pytest.raises(PathNotAllowed):  # a file that does not exist yet: the parent counts
        confine(root / "linkdir" / "new.img", [root])


def test_symlink_inside_root_is_fine(root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert confine(root / "alias" / "x.img", [root]) == root.resolve() / "real" / "x.img"


def test_symlinked_root(tmp_path: Path, root: Path) -> None:
    link_root = tmp_path / "link-root"
    link_root.symlink_to(root, target_is_directory=True)
    assert confine(root / "a.img", [link_root]) == root.resolve() / "a.img"
    assert confine(link_root / "a.img", [root]) == root.resolve() / "a.img"


def test_symlink_loop(root: Path) -> None:
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(InvalidInput):
        confine(root / "loop", [root])


@pytest.mark.parametrize("name", ["a,b.img", "a=b.img", "x,format=raw", "file=/etc/passwd"])
def test_option_characters(root: Path, name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        confine(f"{root}/{name}", [root])
    assert not isinstance(info.value, PathNotAllowed)
    assert "option separator" in str(info.value)


def test_option_characters_in_folder(root: Path) -> None:
    with pytest.raises(InvalidInput):
        confine(f"{root}/a,b/c.img", [root])


def test_comma_behind_a_symlink(root: Path) -> None:
    (root / "a,b.img").write_bytes(b"")
    (root / "plain.img").symlink_to(root / "a,b.img")
    with pytest.raises(InvalidInput) as info:
        confine(root / "plain.img", [root])
    assert "resolves to" in str(info.value)


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"])
def test_control_characters(root: Path, char: str) -> None:
    with pytest.raises(InvalidInput, match="control character"):
        confine(f"{root}/a{char}b.img", [root])


@pytest.mark.parametrize("text", ["", "   "])
def test_empty(root: Path, text: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        confine(text, [root])


@pytest.mark.parametrize("text", ["a.img", "./a.img", "../vms/a.img", "~/a.img"])
def test_relative(root: Path, text: str) -> None:
    with pytest.raises(InvalidInput, match="not absolute"):
        confine(text, [root])


def test_nonexistent_with_must_exist(root: Path) -> None:
    with pytest.raises(NotFound) as info:
        confine(root / "missing.img", [root], must_exist=True, what="disk")
    assert str(root / "missing.img") in str(info.value)
    assert str(info.value).startswith("disk ")


def test_outside_and_missing_is_not_allowed_not_missing(root: Path, outside: Path) -> None:
    with pytest.raises(PathNotAllowed):
        confine(outside / "missing.img", [root], must_exist=True)


def test_no_roots(root: Path) -> None:
    with pytest.raises(PathNotAllowed, match="none are configured"):
        confine(root / "a.img", [])


def test_pathlike(root: Path) -> None:
    class Custom(os.PathLike[str]):
        def __fspath__(self) -> str:
            return str(root / "c.img")

    assert confine(Custom(), [root]) == root.resolve() / "c.img"


# -- qemu-img progress and errors (pure) --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("    (12.34/100%)", 12.34),
        ("    (0.00/100%)", 0.0),
        ("    (100.00/100%)", 100.0),
        ("(7/100%)", 7.0),
        ("Image committed.", None),
        ("", None),
        ("    (12.34/50%)", None),
    ],
)
def test_parse_progress(text: str, value: float | None) -> None:
    assert parse_progress(text) == value


def test_progress_parser_joins_split_segments() -> None:
    parser = ProgressParser()
    assert parser.feed("    (0.00/100%)\r    (12.") == [0.0]
    assert parser.feed("50/100%)\r    (13.00/1") == [12.5]
    assert parser.feed("00%)\r") == [13.0]
    assert parser.close() == []


def test_progress_parser_drops_repeats_and_regressions() -> None:
    parser = ProgressParser()
    text = "    (1.00/100%)\r    (1.00/100%)\r    (0.50/100%)\r    (2.00/100%)\r"
    assert parser.feed(text) == [1.0, 2.0]


def test_progress_parser_ignores_other_lines_and_reads_unterminated_tail() -> None:
    parser = ProgressParser()
    assert parser.feed("Image committed.\n    (100.00/100%)") == []
    assert parser.close() == [100.0]


def test_progress_parser_clamps() -> None:
    assert ProgressParser().feed("    (150.00/100%)\n") == [100.0]


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        (
            "qemu-img: Could not open 'a': Failed to get shared \"write\" lock\n"
            "Is another process using the image [a]?\n",
            ResourceBusy,
        ),
        (
            "qemu-img: error while writing at byte 0: No space left on device\n",
            NoSpace,
        ),
        (
            "qemu-img: Could not open '/x': Could not open '/x': No such file or directory\n",
            NotFound,
        ),
        ("qemu-img: Image format driver does not support resize\n", InvalidInput),
        ("qemu-img: Use the --shrink option to perform a shrink operation.\n", InvalidInput),
        ("qemu-img: Unknown file format 'xyz'\n", InvalidInput),
        ("qemu-img: something odd happened\n", HypervisorError),
        ("", HypervisorError),
    ],
)
def test_error_from_stderr(stderr: str, cls: type[Exception]) -> None:
    error = error_from_stderr(["convert", "-f", "qcow2"], 1, stderr)
    assert type(error) is cls
    assert str(error).startswith("qemu-img convert failed: ")
    assert "qemu-img: " not in str(error)
    assert error.data["exit_code"] == 1
