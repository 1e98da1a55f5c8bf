"""Export and import for real (TCG, the tiny guest), around one booted guest shared by
the module: a running VM with a checkpoint is exported from one point in time while it
keeps running and writing, imported under a new id with --copy and booted, and its data
checked inside the guest; an export with a missing disk, an ID clash and a MAC clash are
refused by the check with nothing changed; an export registered in place boots.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess, running_host

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
NAME = "exported"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path
        ) -> Iterator[tuple[HostProcess, Path]]:
    """A host service with a second storage root for exports, and one running guest."""
    base = tmp_path_factory.mktemp("export")
    exports = base / "exports"
    exports.mkdir()
    with running_host(base / "data", tiny_image,
                      extra_args=("--storage-root", str(exports))) as host:
        host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny",
                "--memory", "256M")
        host.ok("vm", "start", NAME)
        host.wait_console(NAME, READY)
        host.guest(NAME).wait_ready(BOOT_TIMEOUT)
        yield host, exports


def boot(host: HostProcess, name: str) -> None:
    host.ok("vm", "start", name)
    host.guest(name).wait_ready(BOOT_TIMEOUT)


def manifest(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "vm.json").read_text())
    return data


def test_running_vm_with_a_checkpoint_exports_and_imports_under_a_new_id(
        lab: tuple[HostProcess, Path]) -> None:
    host, exports = lab
    guest = host.guest(NAME)
    guest.ok("echo at-checkpoint > /data/a && sync")
    host.ok("checkpoint", "create", NAME, "--name", "first")
    guest.ok("echo at-export > /data/a && echo kept > /data/b && sync")
    # A writer runs through the export: the copy is of one instant, and the guest goes on.
    guest.ok("(i=0; while [ $i -lt 400 ]; do echo $i > /data/counter; sync; i=$((i+1)); "
             "done) >/dev/null 2>&1 &")
    out = json.loads(host.ok("vm", "export", NAME, str(exports / "one"), "-o", "json"))
    assert out["consistency"] == "frozen" and out["checkpoints"] == 1
    assert host.vm(NAME)["state"] == "Running"
    assert guest.ok("cat /data/b").strip() == "kept"
    folder = exports / "one" / NAME
    record = manifest(folder)
    assert record["state"] == "Off" and len(record["files"]) == 3  # type: ignore[arg-type]

    imported = json.loads(host.ok("vm", "import", str(folder), "--copy", "--new-id",
                                  "--name", "copy", "-o", "json"))
    assert imported["vm"] == "copy" and imported["checkpoints"] == 1
    assert host.vm("copy")["id"] != host.vm(NAME)["id"]
    boot(host, "copy")
    copy = host.guest("copy")
    assert copy.ok("cat /data/a").strip() == "at-export"
    assert copy.ok("cat /data/b").strip() == "kept"
    # The imported checkpoint holds the state of its moment.
    host.ok("vm", "stop", "copy", "--turn-off")
    host.ok("checkpoint", "apply", "copy", "first", "--yes")
    boot(host, "copy")
    assert copy.ok("cat /data/a").strip() == "at-checkpoint"
    assert copy.sh("cat /data/b")[0] != 0
    host.ok("vm", "stop", "copy", "--turn-off")
    host.ok("vm", "delete", "copy", "--delete-disks")


def test_the_check_refuses_a_missing_disk_an_id_clash_and_a_mac_clash(
        lab: tuple[HostProcess, Path]) -> None:
    host, exports = lab
    host.ok("vm", "export", NAME, str(exports / "two"))
    folder = exports / "two" / NAME
    record = manifest(folder)
    for nic in record["config"]["network_adapters"]:  # type: ignore[index]
        nic["dynamic_mac"] = False  # a static MAC: the import keeps it, so it clashes
    (folder / "vm.json").write_text(json.dumps(record))
    base = next(f for f in record["files"] if f["parent"] is None)  # type: ignore[attr-defined]
    hidden = folder / (base["path"] + ".away")
    (folder / base["path"]).rename(hidden)
    vms_before = [(v["name"], v["id"]) for v in host.json("vm", "list")]
    result = host.hv("vm", "import", str(folder))
    assert result.returncode == 2
    problems = [line for line in result.stdout.splitlines() if "problem: " in line]
    assert len(problems) == 4, result.stdout  # one line each
    assert "missing from the export" in result.stdout
    assert "already has the id" in result.stdout and "--new-id" in result.stdout
    assert "static MAC" in result.stdout
    assert f"a VM named '{NAME}' already exists" in result.stdout
    assert [(v["name"], v["id"]) for v in host.json("vm", "list")] == vms_before
    hidden.rename(folder / base["path"])
    result = host.hv("vm", "import", str(folder), "--new-id", "--name", "other")
    assert result.returncode == 2 and "static MAC" in result.stdout
    assert "missing" not in result.stdout and "already has the id" not in result.stdout
    shutil.rmtree(exports / "two")


def test_register_in_place_boots_from_the_export(lab: tuple[HostProcess, Path]) -> None:
    host, exports = lab
    guest = host.guest(NAME)
    guest.ok("echo registered > /data/r && sync")
    host.ok("vm", "export", NAME, str(exports / "three"))
    folder = exports / "three" / NAME
    host.ok("vm", "import", str(folder), "--register", "--new-id", "--name", "inplace")
    disks = host.vm("inplace")["disks"]
    assert all(Path(d["path"]).is_relative_to(folder) for d in disks)
    boot(host, "inplace")
    assert host.guest("inplace").ok("cat /data/r").strip() == "registered"
    host.ok("vm", "stop", "inplace", "--turn-off")
    # The export's files are this VM's now: a second registration is refused.
    again = host.hv("vm", "import", str(folder), "--register", "--new-id", "--name", "x")
    assert again.returncode == 2 and "is a disk of VM 'inplace'" in again.stdout


def test_a_checkpoint_export_is_the_vm_at_that_moment(lab: tuple[HostProcess, Path]) -> None:
    host, exports = lab
    guest = host.guest(NAME)
    guest.ok("echo at-second > /data/c && sync")
    host.ok("checkpoint", "create", NAME, "--name", "second")
    guest.ok("echo later > /data/c && sync")
    out = json.loads(host.ok("checkpoint", "export", NAME, "second", str(exports / "four"),
                             "-o", "json"))
    assert out["checkpoint"] == "second" and out["state"] == "Off"
    folder = exports / "four" / NAME
    record = manifest(folder)
    assert record["checkpoints"]["checkpoints"] == []  # type: ignore[index]
    assert [f["parent"] for f in record["files"]] == [None]  # type: ignore[attr-defined]
    host.ok("vm", "import", str(folder), "--new-id", "--name", "then")
    boot(host, "then")
    assert host.guest("then").ok("cat /data/c").strip() == "at-second"
    host.ok("vm", "stop", "then", "--turn-off")
    host.ok("vm", "delete", "then", "--delete-disks")


def test_a_saved_vm_exports_its_memory_and_the_import_resumes(
        lab: tuple[HostProcess, Path]) -> None:
    host, exports = lab
    guest = host.guest(NAME)
    guest.ok("echo only-in-memory > /tmp/marker")  # the initramfs root: memory only
    host.ok("vm", "stop", NAME, "--save")
    out = json.loads(host.ok("vm", "export", NAME, str(exports / "five"), "-o", "json"))
    assert out["state"] == "Saved"
    folder = exports / "five" / NAME
    host.ok("vm", "import", str(folder), "--new-id", "--name", "resumed",
            "--dest", str(exports))
    assert host.vm("resumed")["state"] == "Saved"
    assert all(Path(d["path"]).is_relative_to(exports / "resumed")
               for d in host.vm("resumed")["disks"])
    boot(host, "resumed")
    assert host.guest("resumed").ok("cat /tmp/marker").strip() == "only-in-memory"
    host.ok("vm", "stop", "resumed", "--turn-off")
    boot(host, NAME)  # the original resumes too: its saved state was only read
    assert guest.ok("cat /tmp/marker").strip() == "only-in-memory"
