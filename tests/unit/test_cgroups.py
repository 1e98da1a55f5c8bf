"""The cgroup interface against directory trees imitating both layouts: which one the
mount table chooses, and what each writes, reads and removes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvstack.resources.cgroups import (
    CgroupUnusable,
    CgroupV1,
    CgroupV2,
    NoCgroups,
    parse_mountinfo,
    probe,
)
from hvstack.resources.cpu import CpuControls
from tests.fake_cgroups import FakeKernel, v1_tree, v2_tree

PARENT = "hvstack-1a2b3"
VM = "6f1c1c1e-3b0a-4a57-9a43-5b1b2d1f0c11"
LIMITED = CpuControls(25_000, 100_000, 200)
FREE = CpuControls(None, 100_000, 100)

# This kind of machine: v1 controllers each mounted alone, an empty cgroup2 beside them.
V1_MACHINE = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_the_mount_table_is_read_as_the_kernel_writes_it() -> None:
    mounts = parse_mountinfo(V1_MACHINE)
    assert [(str(m.point), m.fstype) for m in mounts] == [
        ("/sys/fs/cgroup/cpu", "cgroup"), ("/sys/fs/cgroup/cpuacct", "cgroup"),
        ("/sys/fs/cgroup/memory", "cgroup"), ("/sys/fs/cgroup/systemd", "cgroup"),
        ("/sys/fs/cgroup/unified", "cgroup2")]
    assert mounts[0].super_options == ("rw", "cpu") and not mounts[0].read_only
    # Optional fields before the dash, an escaped blank, a read-only mount.
    odd = parse_mountinfo("50 1 0:9 / /mnt/c\\040g ro,relatime shared:3 master:1 - "
                          "cgroup cgroup ro,cpu,cpuacct\n")
    assert [(str(m.point), m.super_options, m.read_only) for m in odd] == [
        ("/mnt/c g", ("ro", "cpu", "cpuacct"), True)]


def test_v1_is_chosen_where_the_cpu_controller_has_a_v1_hierarchy(tmp_path: Path) -> None:
    cgroups = probe(PARENT, v1_tree(tmp_path))
    assert isinstance(cgroups, CgroupV1) and cgroups.version == "v1"
    assert cgroups.mount == tmp_path / "cpu" and cgroups.unusable() is None
    assert cgroups.summary() == (f"cgroup v1, cpu controller at {tmp_path / 'cpu'}, VMs "
                                 f"under {PARENT}/")
    joined = tmp_path / "joined"
    cgroups = probe(PARENT, v1_tree(joined, cpu_mount="cpu,cpuacct"))
    assert isinstance(cgroups, CgroupV1) and cgroups.mount == joined / "cpu,cpuacct"


def test_v2_is_chosen_on_a_pure_unified_hierarchy(tmp_path: Path) -> None:
    cgroups = probe(PARENT, v2_tree(tmp_path))
    assert isinstance(cgroups, CgroupV2) and cgroups.mount == tmp_path
    assert cgroups.version == "v2" and cgroups.unusable() is None


@pytest.mark.parametrize(("layout", "reason"), [
    ("v1-read-only", "cgroup v1 cpu controller at {root}/cpu is mounted read-only"),
    ("v2-read-only", "cgroup2 hierarchy at {root} is mounted read-only"),
    ("v1-without-cpu", "the cgroup2 hierarchy at {root}/unified does not offer the cpu "
                       "controller"),
    ("v2-without-cpu", "the cgroup2 hierarchy at {root} does not offer the cpu controller"),
    ("nothing", "no cgroup file system is mounted"),
])
def test_no_usable_controller_says_why(tmp_path: Path, layout: str, reason: str) -> None:
    table = {
        "v1-read-only": lambda: v1_tree(tmp_path, read_only=True),
        "v2-read-only": lambda: v2_tree(tmp_path, read_only=True),
        "v1-without-cpu": lambda: v1_tree(tmp_path, with_cpu=False),
        "v2-without-cpu": lambda: v2_tree(tmp_path, controllers="memory pids"),
        "nothing": lambda: "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
    }[layout]()
    cgroups = probe(PARENT, table)
    assert isinstance(cgroups, NoCgroups) and cgroups.version == "none"
    why = cgroups.unusable()
    assert why is not None and reason.format(root=tmp_path) in why
    assert cgroups.summary() == f"none: {why}"
    with pytest.raises(CgroupUnusable, match=r"mounted|offer|no cgroup"):
        cgroups.place(VM, 1234, FREE)
    with pytest.raises(CgroupUnusable):
        cgroups.apply(VM, FREE)
    assert (cgroups.read(VM), cgroups.pids(VM), cgroups.remove(VM), cgroups.vm_ids()) == (
        None, [], True, [])


def test_v1_places_sets_changes_and_removes(tmp_path: Path) -> None:
    alive = {4321}
    kernel = FakeKernel(lambda pid: pid in alive)
    cgroups = probe(PARENT, v1_tree(tmp_path), dirs=kernel)
    group = tmp_path / "cpu" / PARENT / f"vm-{VM}"
    cgroups.place(VM, 4321, LIMITED)
    assert (group / "cpu.cfs_quota_us").read_text() == "25000"
    assert (group / "cpu.cfs_period_us").read_text() == "100000"
    assert (group / "cpu.shares").read_text() == "2048"
    assert cgroups.pids(VM) == [4321] and cgroups.read(VM) == LIMITED
    assert cgroups.vm_ids() == [VM]
    cgroups.apply(VM, FREE)
    assert (group / "cpu.cfs_quota_us").read_text() == "-1"
    assert cgroups.read(VM) == FREE
    # Busy while the process lives, gone once it is not.
    assert cgroups.remove(VM) is False and group.is_dir()
    alive.clear()
    assert cgroups.remove(VM) is True and not group.exists()
    assert cgroups.remove(VM) is True  # already gone
    assert cgroups.read(VM) is None and cgroups.vm_ids() == []
    cgroups.remove_parent()
    assert not (tmp_path / "cpu" / PARENT).exists()
    # Only the cpu hierarchy was touched.
    assert not (tmp_path / "cpuacct" / PARENT).exists()
    assert not (tmp_path / "unified" / PARENT).exists()


def test_v2_enables_the_controller_and_writes_max_and_weight(tmp_path: Path) -> None:
    kernel = FakeKernel(lambda pid: False)
    cgroups = probe(PARENT, v2_tree(tmp_path), dirs=kernel)
    cgroups.place(VM, 4321, LIMITED)
    parent = tmp_path / PARENT
    group = parent / f"vm-{VM}"
    # The root lets the parent have cpu, the parent lets the VM's cgroup have it.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu"
    assert (group / "cpu.max").read_text() == "25000 100000"
    assert (group / "cpu.weight").read_text() == "200"
    assert (group / "cgroup.procs").read_text() == "4321"
    assert cgroups.read(VM) == LIMITED
    cgroups.apply(VM, FREE)
    assert (group / "cpu.max").read_text() == "max 100000"
    assert cgroups.read(VM) == FREE
    assert cgroups.remove(VM) and not group.exists()


def test_an_enabled_controller_is_not_enabled_again(tmp_path: Path) -> None:
    cgroups = probe(PARENT, v2_tree(tmp_path), dirs=FakeKernel())
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory\n")
    cgroups.place(VM, 4321, FREE)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "cpu memory\n"


def test_a_refused_write_is_cgroup_unusable_with_the_file(tmp_path: Path) -> None:
    cgroups = probe(PARENT, v1_tree(tmp_path), dirs=FakeKernel())
    group = tmp_path / "cpu" / PARENT / f"vm-{VM}"
    group.mkdir(parents=True)
    (group / "cgroup.procs").mkdir()  # writing to it fails as a refused write would
    with pytest.raises(CgroupUnusable, match=r"cannot write '4321' to .*cgroup\.procs"):
        cgroups.place(VM, 4321, FREE)
    with pytest.raises(CgroupUnusable, match="does not exist"):
        cgroups.apply("another", FREE)
