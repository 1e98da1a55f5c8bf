"""File modes at start-up, the runtime directory's trust rule, and a socket path that
must never replace a file."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvstack.errors import AlreadyExists, Conflict
from hvstack.host.files import AccessGroup, secure_data_dir, secure_run_dir
from hvstack.server import _bind_unix, _prepare_unix_socket

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_data_dir_and_existing_files_are_made_private(tmp_path: Path,
                                                      restore_umask: None) -> None:
    data = tmp_path / "data"
    (data / "vms" / "a").mkdir(parents=True, mode=0o777)
    os.chmod(data / "vms", 0o777)
    os.chmod(data / "vms" / "a", 0o755)
    for name in ("hvstack.db", "vms/a/vm.json", "vms/a/disk.qcow2"):
        (data / name).write_text("x")
        os.chmod(data / name, 0o664)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o644)
    (data / "link").symlink_to(outside)
    group = AccessGroup(os.getegid(), "g")
    secure_data_dir(data, group)
    assert mode(data) == 0o750 and os.stat(data).st_gid == group.gid
    assert mode(data / "vms") == 0o700 and mode(data / "vms" / "a") == 0o700
    for name in ("hvstack.db", "vms/a/vm.json", "vms/a/disk.qcow2"):
        assert mode(data / name) == 0o600, name
    assert mode(outside) == 0o644  # a link's target is left alone
    new = data / "new"
    new.write_text("x")  # the umask covers files made from now on
    assert mode(new) == 0o600


def test_run_dir_is_created_private(tmp_path: Path) -> None:
    run = tmp_path / "run"
    secure_run_dir(run)
    assert mode(run) == 0o700
    secure_run_dir(run)  # ours: trusted again
    os.chmod(run, 0o755)
    secure_run_dir(run)  # ours, not writable by others: trusted, and tightened
    assert mode(run) == 0o700


@pytest.mark.parametrize("case", ["group-writable", "other-writable", "symlink", "file",
                                  "foreign"])
def test_run_dir_made_by_someone_else_is_refused(tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    if case == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        run.symlink_to(tmp_path / "elsewhere")
    elif case == "file":
        run.write_text("")
    else:
        run.mkdir(mode=0o700)
        os.chmod(run, {"group-writable": 0o770, "other-writable": 0o703,
                       "foreign": 0o700}[case])
        if case == "foreign":
            if os.geteuid() != 0:
                pytest.skip("needs root to make a directory owned by another user")
            os.chown(run, NOBODY, NOBODY)
    with pytest.raises(Conflict, match="refusing to use the runtime directory"):
        secure_run_dir(run)


def test_listen_on_a_regular_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    victim = tmp_path / "important.txt"
    victim.write_text("keep me")
    with pytest.raises(AlreadyExists, match="not a socket"):
        _bind_unix(str(victim), os.getegid())
    assert victim.read_text() == "keep me"
    (tmp_path / "dir").mkdir()
    with pytest.raises(AlreadyExists):
        _prepare_unix_socket(str(tmp_path / "dir"))
    link = tmp_path / "link.sock"
    link.symlink_to(victim)
    with pytest.raises(AlreadyExists):
        _prepare_unix_socket(str(link))
    assert victim.read_text() == "keep me"


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path,
                                                   restore_umask: None) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    os.umask(0o077)
    sock = _bind_unix(str(path), os.getegid())
    try:
        assert mode(path) == 0o660 and stat.S_ISSOCK(os.lstat(path).st_mode)
        sock.listen()
        with pytest.raises(Conflict, match="already listening"):
            _prepare_unix_socket(str(path))
    finally:
        sock.close()
