"""Copy-file into and out of a guest (fake agent): chunked, verified, atomic, the path
rules, the size limit, the guest services switch, and ``hv vm copy-file``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from hvstack.host.service import HostService
from tests.functional.fakes import API, assert_problem, eventually, finish_job
from tests.functional.guest_cli import hv

if TYPE_CHECKING:
    from tests.functional.guest_support import Guests

TEST_COPY_LIMIT = 4 * 1024 * 1024  # the test guest_policy's (guest_support.test_policy)

pytest_plugins = ("tests.functional.guest_support",)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".hvtmp-" in p.name)


async def upload(api: httpx.AsyncClient, name: str, path: str, data: bytes, *,
                 body: bytes | None = None, **options: Any) -> httpx.Response:
    started = await api.post(f"{API}/vms/{name}/files", json={
        "direction": "to-guest", "guest_path": path, "size": len(data), "sha256": sha(data),
        **options})
    if started.status_code != 202:
        return started
    return await api.put(started.json()["data_url"], content=data if body is None else body)


async def download(api: httpx.AsyncClient, name: str, path: str) -> tuple[dict[str, Any],
                                                                         bytes]:
    started = await api.post(f"{API}/vms/{name}/files", json={
        "direction": "from-guest", "guest_path": path})
    assert started.status_code == 202, started.text
    info: dict[str, Any] = started.json()
    reply = await api.get(info["data_url"])
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-hv-sha256"] == info["sha256"]
    return info, reply.content


async def test_copy_needs_guest_services(guest_api: httpx.AsyncClient, guests: Guests,
                                         guest_root: Path) -> None:
    await guests.boot("g1", guest_services=False)
    problem = assert_problem(await upload(guest_api, "g1", f"{guest_root}/x", b"data"), 409,
                             "integration-service-disabled")
    assert problem["service"] == "guest_services"
    assert "hv vm set g1 --enable guest-services" in problem["detail"]
    started = await guest_api.post(f"{API}/vms/g1/files", json={"direction": "from-guest",
                                                         "guest_path": "/etc/hostname"})
    assert_problem(started, 409, "integration-service-disabled")


async def test_upload_and_download_round_trip(guest_api: httpx.AsyncClient, guests: Guests,
                                              guest_root: Path) -> None:
    await guests.boot("g1")
    data = os.urandom(300 * 1024 + 7)  # several write chunks and a short last one
    target = f"{guest_root}/in/file.bin"
    reply = await upload(guest_api, "g1", target, data, create_dirs=True)
    assert reply.status_code == 200, reply.text
    job = reply.json()
    assert (job["kind"], job["state"], job["progress"]) == ("copy-to-guest", "completed", 100)
    assert job["result"] == {"vm": "g1", "guest_path": target, "size": len(data),
                             "sha256": sha(data), "verified": "sha256sum in the guest"}
    assert Path(target).read_bytes() == data
    assert oct(Path(target).stat().st_mode & 0o777) == "0o644"
    assert leftovers(guest_root / "in") == []

    info, body = await download(guest_api, "g1", target)
    assert (info["size"], info["sha256"], body) == (len(data), sha(data), data)
    job = await finish_job(guest_api, info["job"])
    assert (job["kind"], job["state"]) == ("copy-from-guest", "completed")

    empty = f"{guest_root}/empty"
    assert (await upload(guest_api, "g1", empty, b"")).status_code == 200
    assert Path(empty).read_bytes() == b""
    assert (await download(guest_api, "g1", empty))[1] == b""


async def test_destination_rules(guest_api: httpx.AsyncClient, guests: Guests,
                                 guest_root: Path, tmp_path: Path) -> None:
    await guests.boot("g1")
    existing = guest_root / "existing"
    existing.write_bytes(b"old")
    existing.chmod(0o600)
    problem = assert_problem(await upload(guest_api, "g1", str(existing), b"new"), 409,
                             "already-exists")
    assert "--overwrite" in problem["detail"]
    assert existing.read_bytes() == b"old"
    assert (await upload(guest_api, "g1", str(existing), b"new", overwrite=True)).status_code == 200
    assert existing.read_bytes() == b"new"
    assert oct(existing.stat().st_mode & 0o777) == "0o600"  # an overwrite keeps the mode

    missing = assert_problem(await upload(guest_api, "g1", f"{guest_root}/no/dir/f", b"x"), 404,
                             "not-found")
    assert "--create-dirs" in missing["detail"]
    assert_problem(await upload(guest_api, "g1", str(guest_root), b"x"), 400, "invalid-input")
    assert_problem(await upload(guest_api, "g1", "relative/path", b"x"), 400, "invalid-input")
    assert_problem(await upload(guest_api, "g1", f"{guest_root}/../escape", b"x"), 400,
                   "guest-path-not-allowed")
    for denied in ("/proc/sys/kernel/x", "/sys/x", "/dev/sda", "/dev"):
        assert_problem(await upload(guest_api, "g1", denied, b"x"), 400, "guest-path-not-allowed")
    # A symlinked folder that leads into a denied one is caught in the guest.
    (tmp_path / "secret").mkdir()
    (guest_root / "sneaky").symlink_to(tmp_path / "secret")
    sneaky = assert_problem(await upload(guest_api, "g1", f"{guest_root}/sneaky/f", b"x"), 400,
                            "guest-path-not-allowed")
    assert str(tmp_path / "secret") in sneaky["detail"]
    assert list((tmp_path / "secret").iterdir()) == []


async def test_size_limit(guest_api: httpx.AsyncClient, guests: Guests, guest_root: Path) -> None:
    await guests.boot("g1")
    started = await guest_api.post(f"{API}/vms/g1/files", json={
        "direction": "to-guest", "guest_path": f"{guest_root}/big",
        "size": TEST_COPY_LIMIT + 1})
    problem = assert_problem(started, 413, "file-too-large")
    assert problem["limit"] == TEST_COPY_LIMIT
    big = guest_root / "big-in-guest"
    with big.open("wb") as f:
        f.truncate(TEST_COPY_LIMIT + 1)
    started = await guest_api.post(f"{API}/vms/g1/files", json={"direction": "from-guest",
                                                         "guest_path": str(big)})
    assert_problem(started, 413, "file-too-large")


async def test_failed_uploads_leave_nothing(guest_api: httpx.AsyncClient, guests: Guests,
                                            guest_root: Path) -> None:
    fake = await guests.boot("g1")
    data = os.urandom(200 * 1024)
    target = guest_root / "target"
    # The client announces one sha256 and sends other bytes.
    damaged = assert_problem(await upload(guest_api, "g1", str(target), data,
                                          body=data[:-1] + b"!"), 400, "invalid-input")
    assert "sha256" in damaged["detail"]
    # Fewer bytes than announced.
    short = assert_problem(await upload(guest_api, "g1", str(target), data, body=data[:1000]),
                           400, "invalid-input")
    assert "ended after" in short["detail"]
    # The guest fails while writing.
    fake.errors["guest-file-write"] = "No space left on device"
    failed = assert_problem(await upload(guest_api, "g1", str(target), data), 422,
                            "guest-command-failed")
    assert "No space left on device" in failed["detail"]
    del fake.errors["guest-file-write"]
    await eventually(lambda: leftovers(guest_root) == [], "temporary files are removed")
    assert not target.exists()
    jobs = (await guest_api.get(f"{API}/jobs")).json()
    assert [j["state"] for j in jobs if j["kind"] == "copy-to-guest"] == ["failed"] * 3


async def test_data_connection_rules(guest_api: httpx.AsyncClient, guests: Guests,
                                     guest_root: Path, service: HostService) -> None:
    await guests.boot("g1")
    await guests.boot("g2")
    started = (await guest_api.post(f"{API}/vms/g1/files", json={
        "direction": "to-guest", "guest_path": f"{guest_root}/f", "size": 3})).json()
    transfer = started["transfer_id"]
    assert_problem(await guest_api.put(f"{API}/vms/g2/files/{transfer}", content=b"abc"), 404,
                   "not-found")
    assert_problem(await guest_api.get(f"{API}/vms/g1/files/{transfer}"), 404, "not-found")
    cancelled = await guest_api.post(f"{API}/jobs/{transfer}/cancel")
    assert cancelled.status_code == 200
    job = await finish_job(guest_api, cancelled.json())
    assert job["state"] == "cancelled"
    assert_problem(await guest_api.put(f"{API}/vms/g1/files/{transfer}", content=b"abc"), 404,
                   "not-found")
    assert not (guest_root / "f").exists()


async def test_download_of_a_file_that_changes(guest_api: httpx.AsyncClient, guests: Guests,
                                               guest_root: Path) -> None:
    fake = await guests.boot("g1")
    source = guest_root / "changing"
    source.write_bytes(os.urandom(200 * 1024))
    started = (await guest_api.post(f"{API}/vms/g1/files", json={
        "direction": "from-guest", "guest_path": str(source)})).json()

    def change(command: str) -> None:
        if command == "guest-file-read":
            fake.on_call = None
            source.write_bytes(os.urandom(200 * 1024))

    fake.on_call = change
    got = bytearray()
    try:
        async with guest_api.stream("GET", started["data_url"]) as reply:
            async for chunk in reply.aiter_bytes():
                got += chunk
    except (httpx.HTTPError, Exception):
        pass
    assert len(got) < started["size"]  # the body ended early
    job = await finish_job(guest_api, started["job"])
    assert job["state"] == "failed" and "changed while it was copied" in job["error"]["detail"]


async def test_download_errors(guest_api: httpx.AsyncClient, guests: Guests,
                               guest_root: Path) -> None:
    await guests.boot("g1")

    async def start(path: str) -> httpx.Response:
        return await guest_api.post(f"{API}/vms/g1/files", json={"direction": "from-guest",
                                                           "guest_path": path})

    assert_problem(await start(f"{guest_root}/nothing"), 404, "not-found")
    assert_problem(await start(str(guest_root) + "/"), 400, "invalid-input")
    (guest_root / "dir").mkdir()
    assert_problem(await start(f"{guest_root}/dir"), 400, "invalid-input")
    assert_problem(await start("/proc/self/environ"), 400, "guest-path-not-allowed")



async def test_cli_copy_file_both_ways(guest_served: str, guests: Guests, guest_root: Path,
                                       tmp_path: Path) -> None:
    await guests.boot("g1")
    local = tmp_path / "local.bin"
    data = os.urandom(2 * 1024 * 1024 + 3)
    local.write_bytes(data)
    target = f"{guest_root}/deep/dir/copy.bin"
    result = await hv(guest_served, "vm", "copy-file", "g1", str(local), target, "--create-dirs")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Copied {local} to g1:{target} ({len(data)} bytes")
    assert Path(target).read_bytes() == data

    again = await hv(guest_served, "vm", "copy-file", "g1", str(local), target)
    assert again.exit_code == 2
    assert again.stderr.strip().startswith("error: ") and "exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    back = tmp_path / "back"
    back.mkdir()
    result = await hv(guest_served, "vm", "copy-file", "g1", target, str(back), "--from-guest",
                      "-o", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["path"], info["size"], info["sha256"]) == (str(back / "copy.bin"),
                                                            len(data), sha(data))
    assert (back / "copy.bin").read_bytes() == data
    assert leftovers(back) == []

    exists = await hv(guest_served, "vm", "copy-file", "g1", target, str(back), "--from-guest")
    assert exists.exit_code == 2 and "--overwrite" in exists.stderr
    result = await hv(guest_served, "vm", "copy-file", "g1", target, str(back / "copy.bin"),
                      "--from-guest", "--overwrite")
    assert result.exit_code == 0, result.output

    missing = await hv(guest_served, "vm", "copy-file", "g1", str(tmp_path / "nope"), target)
    assert (missing.exit_code, missing.stderr.strip()) == (
        2, f"error: {tmp_path / 'nope'} does not exist")
    denied = await hv(guest_served, "vm", "copy-file", "g1", str(local), "/proc/x")
    assert denied.exit_code == 2 and "does not allow" in denied.stderr


async def test_cli_copy_that_fails_in_the_guest(guest_served: str, guests: Guests,
                                                guest_root: Path, tmp_path: Path) -> None:
    fake = await guests.boot("g1")
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    fake.errors["guest-file-write"] = "No space left on device"
    result = await hv(guest_served, "vm", "copy-file", "g1", str(local), f"{guest_root}/f")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    await eventually(lambda: leftovers(guest_root) == [], "the temporary file is removed")
    assert not (guest_root / "f").exists()


async def test_client_copies_both_ways_with_progress(guest_served: str, guests: Guests,
                                                     guest_root: Path, tmp_path: Path) -> None:
    """The copy protocol is the Python client's: scripts and the web UI use it as hv does."""
    from hvstack.client import ApiError, Client

    await guests.boot("g1")
    local = tmp_path / "local.bin"
    data = os.urandom(3 * 1024 * 1024 + 5)
    local.write_bytes(data)
    target = f"{guest_root}/c/copy.bin"
    sent: list[tuple[int, int]] = []
    received: list[tuple[int, int]] = []

    def both_ways() -> tuple[dict[str, Any], dict[str, Any]]:
        with Client(guest_served) as client:
            job = client.copy_to_guest("g1", local, target, create_dirs=True,
                                       progress=lambda done, total: sent.append((done, total)))
            info = client.copy_from_guest("g1", target, tmp_path,
                                          progress=lambda d, t: received.append((d, t)))
            return job, info

    job, info = await asyncio.to_thread(both_ways)
    assert job["state"] == "completed" and job["result"]["sha256"] == sha(data)
    assert Path(target).read_bytes() == data
    assert (info["path"], info["size"], info["sha256"]) == (str(tmp_path / "copy.bin"),
                                                            len(data), sha(data))
    assert (tmp_path / "copy.bin").read_bytes() == data
    for steps in (sent, received):
        assert steps[-1] == (len(data), len(data))
        assert [done for done, _ in steps] == sorted(done for done, _ in steps)

    def refused() -> list[ApiError]:
        errors = []
        with Client(guest_served) as client:
            for copy in (lambda: client.copy_to_guest("g1", local, target),
                         lambda: client.copy_from_guest("g1", target, tmp_path),
                         lambda: client.copy_to_guest("g1", tmp_path / "nope", target)):
                try:
                    copy()
                except ApiError as exc:
                    errors.append(exc)
        return errors

    exists_in_guest, exists_here, missing = await asyncio.to_thread(refused)
    assert exists_in_guest.status == 409 and "exists" in str(exists_in_guest)
    assert exists_here.status == 409 and "--overwrite" in str(exists_here)
    assert missing.status == 400 and str(missing) == f"{tmp_path / 'nope'} does not exist"
