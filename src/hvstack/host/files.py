"""Who may read the service's files, and which directories it trusts.

Called once at start-up, before anything is opened:

- :func:`resolve_group` picks the group that may use the unix socket: ``hvstack``
  (created when running as root and missing), else the service user's primary group,
  with a note saying so;
- :func:`secure_data_dir` sets the process umask (files 0600, directories 0700 from now
  on), makes the data directory 0750 owned by that group (its members need to reach the
  socket in it, nothing else) and takes group and other bits off every file and folder
  already inside (the database, VM configs, disks, firmware variables, saved state);
- :func:`secure_run_dir` creates the runtime directory for QEMU's sockets 0700, or
  trusts an existing one only if it is a real directory the service's user owns that
  nobody else can write to.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import Conflict

GROUP_NAME = "hvstack"
UMASK = 0o077
DATA_DIR_MODE = 0o750
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccessGroup:
    """The group whose members may use the unix socket; ``note`` says why it is not
    ``hvstack`` when it is not."""

    gid: int
    name: str
    note: str = ""


def _primary(note: str) -> AccessGroup:
    gid = os.getegid()
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    return AccessGroup(gid, name, f"{note}; using the service user's primary group "
                                  f"'{name}' for the socket instead")


def resolve_group() -> AccessGroup:
    try:
        group = grp.getgrnam(GROUP_NAME)
    except KeyError:
        if os.geteuid() != 0:
            return _primary(f"group '{GROUP_NAME}' does not exist (root creates it)")
        try:
            subprocess.run(["groupadd", "--system", GROUP_NAME], check=True,
                           capture_output=True, timeout=30)
            group = grp.getgrnam(GROUP_NAME)
        except (OSError, subprocess.SubprocessError, KeyError) as exc:
            return _primary(f"group '{GROUP_NAME}' could not be created ({exc})")
        log.info("created the group '%s': its members may use the service's socket",
                 GROUP_NAME)
    if os.geteuid() != 0 and group.gr_gid not in (os.getegid(), *os.getgroups()):
        return _primary(f"the service user is not a member of group '{GROUP_NAME}'")
    return AccessGroup(group.gr_gid, group.gr_name)


def _tighten(path: str, st: os.stat_result, private: int) -> None:
    if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return  # a link's target is not ours to change; sockets are set where bound
    if st.st_mode & private:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~private)


def secure_data_dir(data_dir: Path, group: AccessGroup) -> None:
    os.umask(UMASK)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(data_dir, -1, group.gid)
        os.chmod(data_dir, DATA_DIR_MODE)
    except OSError as exc:
        raise Conflict(f"cannot make the data directory {data_dir} private "
                       f"({exc.strerror or exc}): is it another user's?",
                       path=str(data_dir)) from None
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                _tighten(path, os.lstat(path), 0o077)
            except FileNotFoundError:
                continue


def secure_run_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    owner = st.st_uid
    if not stat.S_ISDIR(st.st_mode) or owner != os.geteuid() or st.st_mode & 0o022:
        try:
            who = pwd.getpwuid(owner).pw_name
        except KeyError:
            who = str(owner)
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "non-directory"
        raise Conflict(
            f"refusing to use the runtime directory {path}: it is a {kind} owned by '{who}' "
            f"with mode {stat.S_IMODE(st.st_mode):04o}, not a directory of the service's "
            f"user that only it may write to; remove it if it is not in use",
            path=str(path))
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
