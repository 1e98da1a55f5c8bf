"""Directory trees that imitate the cgroup file systems, for unit and functional tests.

:func:`v1_tree` lays out what hosts with cgroup v1 mount (a hierarchy per controller:
``cpu``, ``cpuacct``, ``memory``, ``pids`` ..., and an empty cgroup2 at ``unified``);
:func:`v2_tree` a pure unified hierarchy. Each returns the mount table (the text of
``/proc/self/mountinfo``) naming the tree's directories as mount points.
:class:`FakeKernel` makes and removes cgroups as the kernel does: a new cgroup has its
control files (v1: ``cpu.*`` where the parent has them; v2: ``cpu.*`` when the parent's
``cgroup.subtree_control`` enables cpu), and removing one is refused (EBUSY) while a
live process is in it or it has children, else it goes with its control files.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


def _line(n: int, point: Path, fstype: str, super_options: str, options: str = "rw") -> str:
    return (f"{30 + n} 25 0:{40 + n} / {str(point).replace(' ', chr(92) + '040')} "
            f"{options},nosuid,nodev,noexec,relatime shared:{n} - {fstype} {fstype} "
            f"{super_options}")


def v1_tree(root: Path, *, cpu_mount: str = "cpu", read_only: bool = False,
            with_cpu: bool = True) -> str:
    """The v1 layout under ``root``; ``cpu_mount`` names the cpu hierarchy's folder
    (e.g. "cpu,cpuacct" where both share one). Returns the mount table."""
    lines = [f"24 1 0:22 / {root} rw,nosuid - tmpfs tmpfs rw,mode=755"]
    joined = cpu_mount.split(",")
    names = ([cpu_mount] if with_cpu else []) + [c for c in V1_CONTROLLERS if c not in joined]
    for n, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cgroup.procs").write_text("1\n")
        controllers = name.split(",")
        if "cpu" in controllers:
            (folder / "cpu.cfs_period_us").write_text("100000\n")
            (folder / "cpu.cfs_quota_us").write_text("-1\n")
            (folder / "cpu.shares").write_text("1024\n")
        options = "ro" if read_only and "cpu" in controllers else "rw"
        lines.append(_line(n, folder, "cgroup", f"{options},{name}", options))
    unified = root / "unified"
    unified.mkdir(exist_ok=True)
    (unified / "cgroup.controllers").write_text("\n")
    (unified / "cgroup.subtree_control").write_text("\n")
    lines.append(_line(len(names), unified, "cgroup2", "rw,nsdelegate"))
    return "\n".join(lines) + "\n"


def v2_tree(root: Path, *, controllers: str = "cpuset cpu io memory hugetlb pids rdma",
            read_only: bool = False) -> str:
    """A pure unified hierarchy at ``root``; returns the mount table."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / "cgroup.procs").write_text("1\n")
    options = "ro" if read_only else "rw"
    return _line(0, root, "cgroup2", f"{options},nsdelegate,memory_recursiveprot",
                 options) + "\n"


class FakeKernel:
    """``mkdir`` and ``rmdir`` of a cgroup as the kernel answers them (the
    :class:`~hvstack.resources.cgroups.Directories` of a test); ``alive`` says which
    pids run."""

    def __init__(self, alive: Callable[[int], bool] | None = None) -> None:
        self.alive = alive or (lambda pid: True)
        self.busy_answers = 0  # how often rmdir said EBUSY

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        path.mkdir()
        parent = path.parent
        (path / "cgroup.procs").write_text("")
        if (parent / "cgroup.subtree_control").exists():  # v2
            enabled = " ".join(c.lstrip("+") for c in
                               (parent / "cgroup.subtree_control").read_text().split())
            (path / "cgroup.controllers").write_text(enabled + "\n")
            (path / "cgroup.subtree_control").write_text("")
            if "cpu" in enabled.split():
                (path / "cpu.max").write_text("max 100000\n")
                (path / "cpu.weight").write_text("100\n")
        elif (parent / "cpu.shares").exists():  # the v1 cpu hierarchy
            (path / "cpu.cfs_period_us").write_text("100000\n")
            (path / "cpu.cfs_quota_us").write_text("-1\n")
            (path / "cpu.shares").write_text("1024\n")

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        procs = path / "cgroup.procs"
        pids = [int(p) for p in procs.read_text().split()] if procs.is_file() else []
        if any(self.alive(pid) for pid in pids) or any(p.is_dir() for p in path.iterdir()):
            self.busy_answers += 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()
