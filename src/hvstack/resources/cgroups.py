"""A small cgroup interface for the CPU controller, cgroup v1 and v2 behind it.

:func:`probe` reads the mount table (``/proc/self/mountinfo``, or text given by a test)
and returns the :class:`Cgroups` this machine offers:

* :class:`CgroupV1` where the ``cpu`` controller has a v1 hierarchy of its own (mounted
  as ``.../cpu`` or ``.../cpu,cpuacct``); the other v1 controllers and an empty cgroup2
  beside them do not matter. Settings: ``cpu.cfs_quota_us``, ``cpu.cfs_period_us``,
  ``cpu.shares``.
* :class:`CgroupV2` where a cgroup2 hierarchy offers ``cpu`` (``cgroup.controllers``);
  the controller is enabled in ``cgroup.subtree_control`` of the root and of the
  service's parent. Settings: ``cpu.max``, ``cpu.weight``.
* :class:`NoCgroups` otherwise (no controller, mounted read-only), carrying the reason;
  every change raises :class:`CgroupUnusable` with it.

Each VM's cgroup is ``<mount>/<parent>/vm-<id>``, the parent named by the host service
(one per service: several may share a machine). :meth:`Cgroups.place` creates it, writes
the settings and then moves a process in through ``cgroup.procs`` (which moves all its
threads); :meth:`Cgroups.remove` removes it once empty, answering False while the kernel
still calls it busy (the caller retries). The mount points come from the mount table and
making and removing directories is injectable (:class:`Directories`: what the kernel
does there, creating control files and refusing busy cgroups, a test imitates), so tests
run against a directory tree imitating either layout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvstack.errors import HypervisorError
from hvstack.resources.cpu import CpuControls, v1_shares

MOUNTINFO = Path("/proc/self/mountinfo")
VM_PREFIX = "vm-"


class CgroupUnusable(HypervisorError):
    """The cgroup CPU controller cannot be used (missing, read-only, refused a write)."""


class Cgroups(Protocol):
    """The CPU controller of one hierarchy, for the VMs of one host service."""

    @property
    def version(self) -> str:
        """"v1", "v2", or "none"."""
        ...

    def summary(self) -> str:
        """One line for ``hv host info``: the version and where, or why none."""
        ...

    def unusable(self) -> str | None:
        """Why cgroups cannot be used here; None when they can."""
        ...

    def place(self, vm_id: str, pid: int, controls: CpuControls) -> None:
        """Create the VM's cgroup (if needed), write ``controls``, move ``pid`` in."""
        ...

    def apply(self, vm_id: str, controls: CpuControls) -> None:
        """Write ``controls`` to the VM's existing cgroup."""
        ...

    def read(self, vm_id: str) -> CpuControls | None:
        """The controls the VM's cgroup has; None when it has none."""
        ...

    def pids(self, vm_id: str) -> list[int]:
        """The processes in the VM's cgroup (none when it has none)."""
        ...

    def remove(self, vm_id: str) -> bool:
        """Remove the VM's cgroup; True when it is gone (or never was), False while
        the kernel still calls it busy."""
        ...

    def vm_ids(self) -> list[str]:
        """The VMs that have a cgroup under this service's parent."""
        ...

    def remove_parent(self) -> None:
        """Remove the service's parent cgroup if it is empty (best effort)."""
        ...


class Directories(Protocol):
    """Making and removing cgroups: directories, on which the kernel acts."""

    def mkdir(self, path: Path) -> None:
        """Make ``path`` (nothing if it exists); OSError as the kernel answers."""
        ...

    def rmdir(self, path: Path) -> None:
        """Remove ``path``; OSError EBUSY while processes or children are in it."""
        ...


class OsDirectories:
    def mkdir(self, path: Path) -> None:
        path.mkdir(exist_ok=True)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)


@dataclass(frozen=True)
class Mount:
    """One line of the mount table, what matters of it."""

    point: Path
    fstype: str
    options: frozenset[str]  # the mount's and the super block's, together
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts in ``text`` (the format of ``/proc/self/mountinfo``)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 6 or len(fields) < dash + 4:
            continue
        fstype = fields[dash + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        super_options = tuple(fields[dash + 3].split(","))
        mounts.append(Mount(Path(_unescape(fields[4])), fstype,
                            frozenset(fields[5].split(",")) | frozenset(super_options),
                            super_options))
    return mounts


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupUnusable(f"cannot read {path}: {exc.strerror or exc}") from exc


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupUnusable(f"cannot write '{value}' to {path}: "
                             f"{exc.strerror or exc}") from exc


class _Hierarchy:
    """What both versions share: the service's parent under a mount, the VMs' cgroups
    in it, moving processes in, removing."""

    version = ""

    def __init__(self, mount: Path, parent: str, dirs: Directories | None = None) -> None:
        self.mount = mount
        self.parent = mount / parent
        self._dirs = dirs or OsDirectories()

    def unusable(self) -> str | None:
        return None

    def path(self, vm_id: str) -> Path:
        return self.parent / f"{VM_PREFIX}{vm_id}"

    def _mkdir(self, path: Path) -> None:
        try:
            self._dirs.mkdir(path)
        except OSError as exc:
            raise CgroupUnusable(f"cannot create cgroup {path}: "
                                 f"{exc.strerror or exc}") from exc

    def _prepare_parent(self) -> None:
        self._mkdir(self.parent)

    def _write_controls(self, group: Path, controls: CpuControls) -> None:
        raise NotImplementedError

    def place(self, vm_id: str, pid: int, controls: CpuControls) -> None:
        self._prepare_parent()
        group = self.path(vm_id)
        self._mkdir(group)
        self._write_controls(group, controls)
        _write(group / "cgroup.procs", str(pid))

    def apply(self, vm_id: str, controls: CpuControls) -> None:
        group = self.path(vm_id)
        if not group.is_dir():
            raise CgroupUnusable(f"cgroup {group} does not exist")
        self._write_controls(group, controls)

    def pids(self, vm_id: str) -> list[int]:
        try:
            text = (self.path(vm_id) / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]

    def remove(self, vm_id: str) -> bool:
        group = self.path(vm_id)
        try:
            self._dirs.rmdir(group)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise CgroupUnusable(f"cannot remove cgroup {group}: "
                                 f"{exc.strerror or exc}") from exc
        return True

    def vm_ids(self) -> list[str]:
        try:
            entries = list(self.parent.iterdir())
        except OSError:
            return []
        return sorted(e.name[len(VM_PREFIX):] for e in entries
                      if e.name.startswith(VM_PREFIX) and e.is_dir())

    def remove_parent(self) -> None:
        with contextlib.suppress(OSError):  # a VM still in it, or gone: either is fine
            self._dirs.rmdir(self.parent)


class CgroupV1(_Hierarchy):
    """The v1 ``cpu`` controller's own hierarchy mounted at ``mount``."""

    version = "v1"

    def summary(self) -> str:
        return f"cgroup v1, cpu controller at {self.mount}, VMs under {self.parent.name}/"

    def _write_controls(self, group: Path, controls: CpuControls) -> None:
        # The period first: a quota is checked against the period in force.
        _write(group / "cpu.cfs_period_us", str(controls.period_us))
        _write(group / "cpu.cfs_quota_us", str(controls.v1_quota))
        _write(group / "cpu.shares", str(v1_shares(controls.weight)))

    def read(self, vm_id: str) -> CpuControls | None:
        group = self.path(vm_id)
        if not group.is_dir():
            return None
        quota = int(_read(group / "cpu.cfs_quota_us"))
        shares = int(_read(group / "cpu.shares"))
        return CpuControls(None if quota < 0 else quota,
                           int(_read(group / "cpu.cfs_period_us")),
                           round(shares * 100 / 1024))


class CgroupV2(_Hierarchy):
    """A unified (v2) hierarchy mounted at ``mount`` that offers ``cpu``."""

    version = "v2"

    def summary(self) -> str:
        return f"cgroup v2 at {self.mount} (cpu.max, cpu.weight), VMs under {self.parent.name}/"

    def _prepare_parent(self) -> None:
        _enable_cpu(self.mount)
        self._mkdir(self.parent)
        _enable_cpu(self.parent)

    def _write_controls(self, group: Path, controls: CpuControls) -> None:
        _write(group / "cpu.max", controls.v2_max)
        _write(group / "cpu.weight", str(controls.weight))

    def read(self, vm_id: str) -> CpuControls | None:
        group = self.path(vm_id)
        if not group.is_dir():
            return None
        quota, period = _read(group / "cpu.max").split()
        return CpuControls(None if quota == "max" else int(quota), int(period),
                           int(_read(group / "cpu.weight")))


def _enable_cpu(group: Path) -> None:
    """Enable the cpu controller for ``group``'s children (cgroup.subtree_control)."""
    control = group / "cgroup.subtree_control"
    if "cpu" not in _read(control).split():
        _write(control, "+cpu")


class NoCgroups:
    """No usable CPU controller: every change raises :class:`CgroupUnusable`."""

    version = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def summary(self) -> str:
        return f"none: {self.reason}"

    def unusable(self) -> str | None:
        return self.reason

    def place(self, vm_id: str, pid: int, controls: CpuControls) -> None:
        raise CgroupUnusable(self.reason)

    def apply(self, vm_id: str, controls: CpuControls) -> None:
        raise CgroupUnusable(self.reason)

    def read(self, vm_id: str) -> CpuControls | None:
        return None

    def pids(self, vm_id: str) -> list[int]:
        return []

    def remove(self, vm_id: str) -> bool:
        return True

    def vm_ids(self) -> list[str]:
        return []

    def remove_parent(self) -> None:
        return None


def probe(parent: str, mountinfo: str | None = None,
          dirs: Directories | None = None) -> Cgroups:
    """The cgroups to use for a service whose cgroups go under ``parent``, from the
    mount table ``mountinfo`` (default: this process's)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError as exc:
            return NoCgroups(f"cannot read the mount table: {exc.strerror or exc}")
    mounts = parse_mountinfo(mountinfo)
    v1 = [m for m in mounts if m.fstype == "cgroup" and "cpu" in m.super_options]
    if v1:
        return _usable(v1[0], CgroupV1(v1[0].point, parent, dirs), "cgroup v1 cpu controller")
    unified = [m for m in mounts if m.fstype == "cgroup2"]
    for mount in unified:
        try:
            controllers = (mount.point / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "cpu" in controllers:
            return _usable(mount, CgroupV2(mount.point, parent, dirs), "cgroup2 hierarchy")
    if unified:
        return NoCgroups(f"the cgroup2 hierarchy at {unified[0].point} does not offer the "
                         "cpu controller, and no cgroup v1 hierarchy has it")
    if mounts:
        return NoCgroups("no cgroup v1 hierarchy has the cpu controller and no cgroup2 "
                         "hierarchy is mounted")
    return NoCgroups("no cgroup file system is mounted")


def _usable(mount: Mount, cgroups: Cgroups, what: str) -> Cgroups:
    if mount.read_only or not os.access(mount.point, os.W_OK):
        return NoCgroups(f"the {what} at {mount.point} is mounted read-only")
    return cgroups
