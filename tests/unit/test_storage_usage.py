"""The one disk-in-use rule, the format-by-name rule and the service-file guard, with
worked examples (no I/O but the qcow2 header reader's temporary files)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hvstack.errors import InvalidInput, PathNotAllowed, ResourceBusy
from hvstack.storage.formats import format_for
from hvstack.storage.paths import check_disk_file
from hvstack.storage.usage import Attached, Operation, check_use, qcow2_parent, scan_parents

DATA = Path("/var/lib/hvstack")
IMAGES = DATA / "images"
TINY = IMAGES / "tiny.qcow2"
A0 = DATA / "vms/a/disk0.qcow2"  # VM a's disk, a child of the tiny image
B0 = DATA / "vms/b/disk0.qcow2"
FREE = Path("/srv/free.qcow2")  # attached nowhere, parent of nothing
BASE = Path("/srv/base.qcow2")  # parent of the unattached CHILD
CHILD = Path("/srv/child.qcow2")
PARENTS = {A0: TINY, B0: TINY, CHILD: BASE}


def attachments(a_state: str = "Off", b_state: str = "Running") -> list[Attached]:
    return [Attached(A0, "a", "id-a", a_state), Attached(B0, "b", "id-b", b_state)]


def allowed(path: Path, operation: Operation, **kwargs: object) -> bool:
    try:
        check_use(path, operation, attachments(), PARENTS, images_dir=IMAGES,
                  **kwargs)  # type: ignore[arg-type]
    except ResourceBusy:
        return False
    return True


@pytest.mark.parametrize(("path", "operation", "expected"), [
    # modify (resize, compact, merge the disk itself, delete): nothing else may use it
    (FREE, "modify", True),
    (A0, "modify", False),  # attached to a VM that is Off: still only through the VM
    (B0, "modify", False),
    (TINY, "modify", False),  # a managed image
    (BASE, "modify", False),  # the parent of another disk
    (CHILD, "modify", True),
    # read (convert's source): only a running VM's disk is refused
    (A0, "read", True),
    (B0, "read", False),
    (TINY, "read", True),
    # new-parent: an attached disk would change under the new child
    (A0, "new-parent", False),
    (TINY, "new-parent", True),
    (BASE, "new-parent", True),
    # attach to VM c: not an image, not a parent, not a disk another VM is running on
    (FREE, "attach", True),
    (A0, "attach", True),  # VM a is Off (starting both is refused at start)
    (B0, "attach", False),
    (TINY, "attach", False),
    (BASE, "attach", False),
])
def test_worked_examples(path: Path, operation: Operation, expected: bool) -> None:
    assert allowed(path, operation, vm_id="id-c") is expected


def test_merge_into_ignores_only_the_child_being_merged() -> None:
    assert allowed(BASE, "merge-into", child=CHILD)
    assert not allowed(TINY, "merge-into", child=A0)  # an image, and B0 uses it too
    links = {CHILD: BASE, Path("/srv/sibling.qcow2"): BASE}
    with pytest.raises(ResourceBusy, match="sibling"):
        check_use(BASE, "merge-into", [], links, images_dir=IMAGES, child=CHILD)


def test_start_refuses_a_disk_another_vm_runs_and_a_parent() -> None:
    assert not allowed(B0, "start", vm_id="id-a")
    assert allowed(A0, "start", vm_id="id-a")
    assert not allowed(BASE, "start", vm_id="id-a")
    with pytest.raises(ResourceBusy, match="attached to this VM already"):
        check_use(A0, "attach", attachments(), {}, images_dir=IMAGES, vm_id="id-a")


def test_the_message_names_the_vm_and_the_state() -> None:
    with pytest.raises(ResourceBusy) as caught:
        check_use(B0, "modify", attachments(), PARENTS, images_dir=IMAGES)
    assert "VM 'b' (Running)" in caught.value.message
    assert caught.value.data["vm"] == "b"


@pytest.mark.parametrize(("name", "given", "expected"), [
    ("win.vhdx", None, "vhdx"),
    ("a.vhd", None, "vpc"),
    ("a.VHD", "vhd", "vpc"),
    ("a.qcow2", None, "qcow2"),
    ("a.raw", None, "raw"),
    ("a.img", "raw", "raw"),
    ("a.bin", "qcow2", "qcow2"),
    ("a.bin", "vhd", "vpc"),
])
def test_the_extension_decides_unless_format_says(name: str, given: str | None,
                                                   expected: str) -> None:
    assert format_for(Path("/d") / name, given) == expected


@pytest.mark.parametrize(("name", "given", "needle"), [
    ("x.vhdx", "qcow2", "named as a vhdx disk but --format says qcow2"),
    ("x.raw", "qcow2", "named as a raw disk"),
    ("x.bin", None, "give its format with --format"),
    ("x", None, "no known extension"),
    ("x.qcow2", "vmdk", "not one of"),
])
def test_contradictions_and_unknown_names_are_errors(name: str, given: str | None,
                                                     needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        format_for(Path("/d") / name, given)


@pytest.mark.parametrize("name", [
    "hvstack.db", "hvstack.db-wal", "hv.lock", "hv.sock", "vms/x/vm.json",
    "vms/x/efivars.fd", "vms/x/saved-state.bin", "vms/x/console.log", "vms/x/qemu.pid",
    "vms/x/.disk0.qcow2.1234.hvtmp", "images/.tiny.qcow2.tmp",
])
def test_service_files_are_not_disks(tmp_path: Path, name: str) -> None:
    with pytest.raises(PathNotAllowed):
        check_disk_file(tmp_path / "data" / name, tmp_path / "data", tmp_path / "run")


def test_disks_in_the_data_directory_and_elsewhere_are_disks(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    for path in (data / "vms/x/disk0.qcow2", data / "images/tiny.qcow2", data / "a.raw",
                 tmp_path / "srv/any.bin"):
        assert check_disk_file(path, data, run) == path
    with pytest.raises(PathNotAllowed, match="runtime file"):
        check_disk_file(run / "x/qmp.sock", data, run)


def qcow2_header(backing: bytes) -> bytes:
    header = bytearray(512)
    header[:4] = b"QFI\xfb"
    struct.pack_into(">IQI", header, 4, 3, 104, len(backing))
    header[104:104 + len(backing)] = backing
    return bytes(header)


def test_scan_reads_parents_from_qcow2_headers_only(tmp_path: Path) -> None:
    (tmp_path / "base.qcow2").write_bytes(qcow2_header(b""))
    (tmp_path / "child.qcow2").write_bytes(qcow2_header(b"base.qcow2"))
    (tmp_path / "abs.qcow2").write_bytes(qcow2_header(b"/etc/shadow"))
    (tmp_path / "guest.raw").write_bytes(qcow2_header(b"base.qcow2"))  # not a .qcow2
    (tmp_path / ".hidden.qcow2").write_bytes(qcow2_header(b"base.qcow2"))
    assert qcow2_parent(tmp_path / "base.qcow2") is None
    links = scan_parents([tmp_path], [])
    assert links == {tmp_path / "child.qcow2": tmp_path / "base.qcow2",
                     tmp_path / "abs.qcow2": Path("/etc/shadow")}
