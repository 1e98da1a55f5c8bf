"""Errors through the REST API: every one is problem+json with data a client can use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from hvstack.host.service import HostService
from tests.functional.fakes import (
    API,
    assert_problem,
    create_vm,
    run_job,
    show_vm,
)

# -- 409: operations the state does not allow ---------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "operation", "required", "detail"), [
    ("post", "pause", None, "pause", ["Running"],
     "cannot pause VM 'web' while it is Off: start it first"),
    ("post", "resume", None, "resume", ["Paused"],
     "cannot resume VM 'web' while it is Off: it must be Paused"),
    ("post", "save", None, "save", ["Running", "Paused"],
     "cannot save VM 'web' while it is Off: start it first"),
    ("post", "stop", None, "shut down", ["Starting", "Running", "Paused", "Stopping"],
     "cannot shut down VM 'web': it is already Off"),
    ("post", "stop", {"mode": "turn-off"}, "turn off",
     ["Starting", "Running", "Paused", "Saving", "Stopping"],
     "cannot turn off VM 'web': it is already Off"),
    ("post", "stop", {"mode": "discard-saved-state"}, "discard the saved state of",
     ["Saved"], "cannot discard the saved state of VM 'web': it is already Off"),
    ("post", "restart", None, "restart", ["Running"],
     "cannot restart VM 'web' while it is Off: start it first"),
])
async def test_operations_on_an_off_vm(api: httpx.AsyncClient, method: str, path: str,
                                       body: dict[str, Any] | None, operation: str,
                                       required: list[str], detail: str) -> None:
    await create_vm(api, "web")
    response = await api.request(method.upper(), f"{API}/vms/web/{path}", json=body)
    problem = assert_problem(response, 409, "invalid-state")
    assert problem["vm"] == "web"
    assert problem["state"] == "Off"
    assert problem["operation"] == operation
    assert problem["required"] == required
    assert problem["detail"] == detail
    assert (await show_vm(api, "web"))["state"] == "Off"


async def test_operations_on_a_running_vm(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    problem = assert_problem(await api.post(f"{API}/vms/web/start"), 409, "invalid-state")
    assert (problem["state"], problem["required"]) == ("Running", ["Off", "Saved"])
    problem = assert_problem(await api.post(f"{API}/vms/web/resume"), 409, "invalid-state")
    assert problem["required"] == ["Paused"]
    problem = assert_problem(await api.delete(f"{API}/vms/web"), 409, "invalid-state")
    assert problem["operation"] == "delete"
    assert problem["required"] == ["Off", "Saved"]
    problem = assert_problem(await api.patch(f"{API}/vms/web", json={"cpus": 1}), 409,
                             "invalid-state")
    assert problem["state"] == "Running" and problem["required"] == ["Off"]
    assert problem["detail"] == ("cannot change the processor count of VM 'web' while it "
                                 "is Running: stop it first")
    problem = assert_problem(await api.patch(f"{API}/vms/web", json={"memory": "1G",
                                                                     "notes": "n"}),
                             409, "invalid-state")
    assert problem["detail"] == ("cannot change the memory of VM 'web' while it is "
                                 "Running: stop it first")
    assert (await show_vm(api, "web"))["notes"] == ""
    assert (await show_vm(api, "web"))["state"] == "Running"


async def test_operations_on_a_saved_vm(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    await run_job(api, "web", "save")
    for path in ("pause", "resume", "save", "stop", "restart"):
        problem = assert_problem(await api.post(f"{API}/vms/web/{path}"), 409, "invalid-state")
        assert problem["state"] == "Saved"


# -- 400: bad input ------------------------------------------------------------------------


def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir(exist_ok=True)
    disk = folder / "disk.qcow2"
    disk.write_bytes(b"")
    return disk


@pytest.mark.parametrize(("body", "slug", "says"), [
    ({"name": ""}, "invalid-input", "must not be empty"),
    ({"name": "   "}, "invalid-input", "must not be empty"),
    ({"name": "a/b"}, "invalid-input", "'/'"),
    ({"name": ".."}, "invalid-input", "'..'"),
    ({"name": "a" * 101}, "invalid-input", "at most 100"),
    ({"name": "bell\a"}, "invalid-input", "control characters"),
    ({"name": "web", "memory": "lots"}, "invalid-input", "memory 'lots' is not a size"),
    ({"name": "web", "memory": "-1G"}, "invalid-input", "not a size"),
    ({"name": "web", "memory": "1.5"}, "invalid-input", "whole number of bytes"),
    ({"name": "web", "memory": "16M"}, "invalid-input", "minimum of 32 MiB"),
    ({"name": "web", "memory": "512"}, "invalid-input",
     "memory '512' means 512 bytes: did you mean 512M?"),
    ({"name": "web", "memory": 512}, "invalid-input", "did you mean 512M?"),
    ({"name": "web", "new_disk": "20"}, "invalid-input",
     "disk size '20' means 20 bytes: did you mean 20G?"),
    ({"name": "web", "memory": 1.5}, "invalid-input", "memory"),
    ({"name": "web", "colour": "blue"}, "invalid-input", "colour"),
    ({"name": "web", "generation": 3}, "invalid-input", "generation"),
    ({"name": "web", "generation": "2x"}, "invalid-input", "generation"),
    ({"name": "web", "cpus": 0}, "invalid-input", "cpus"),
    ({"name": "web", "os_type": "beos"}, "invalid-input", "os_type"),
    ({"name": "web", "auto_start": "sometimes"}, "invalid-input", "auto_start"),
    ({"name": "web", "boot_order": ["disk", "disk"]}, "invalid-input", "twice"),
    ({"name": "web", "new_disk": "lots"}, "invalid-input", "disk size 'lots'"),
    ({"name": "web", "disk": "relative/disk.qcow2"}, "invalid-input", "not absolute"),
    ({"cpus": 1}, "invalid-input", "name"),
])
async def test_create_with_bad_input(api: httpx.AsyncClient, body: dict[str, Any], slug: str,
                                     says: str) -> None:
    problem = assert_problem(await api.post(f"{API}/vms", json=body), 400, slug)
    assert says in problem["detail"], problem
    assert (await api.get(f"{API}/vms")).json() == []


async def test_create_with_a_body_that_is_not_json(api: httpx.AsyncClient) -> None:
    response = await api.post(f"{API}/vms", content=b"{not json",
                              headers={"content-type": "application/json"})
    assert_problem(response, 400, "invalid-input")


async def test_disk_outside_the_storage_roots(api: httpx.AsyncClient, tmp_path: Path) -> None:
    disk = outside(tmp_path)
    response = await api.post(f"{API}/vms", json={"name": "web", "disk": str(disk)})
    problem = assert_problem(response, 400, "path-not-allowed")
    assert problem["path"] == str(disk)
    assert str(tmp_path / "disks") in problem["roots"]


async def test_disk_path_escaping_the_roots_with_dotdot(api: httpx.AsyncClient,
                                                        tmp_path: Path) -> None:
    outside(tmp_path)
    sneaky = f"{tmp_path}/disks/../elsewhere/disk.qcow2"
    response = await api.post(f"{API}/vms", json={"name": "web", "disk": sneaky})
    assert_problem(response, 400, "path-not-allowed")


async def test_disk_symlink_out_of_the_roots(api: httpx.AsyncClient, tmp_path: Path) -> None:
    target = outside(tmp_path)
    link = tmp_path / "disks" / "link.qcow2"
    link.symlink_to(target)
    response = await api.post(f"{API}/vms", json={"name": "web", "disk": str(link)})
    assert_problem(response, 400, "path-not-allowed")


@pytest.mark.parametrize("field", ["disk", "dvd"])
@pytest.mark.parametrize("bad", ["a,b.img", "a,file.driver=ssh.img", "x=y.img"])
async def test_paths_with_option_separators(api: httpx.AsyncClient, tmp_path: Path,
                                            field: str, bad: str) -> None:
    path = tmp_path / "disks" / bad
    path.write_bytes(b"")
    response = await api.post(f"{API}/vms", json={"name": "web", field: str(path)})
    problem = assert_problem(response, 400, "invalid-input")
    assert "option separator" in problem["detail"]


async def test_missing_disk_inside_the_roots_is_not_found(api: httpx.AsyncClient,
                                                          tmp_path: Path) -> None:
    response = await api.post(f"{API}/vms", json={"name": "web",
                                                  "disk": str(tmp_path / "disks" / "no.qcow2")})
    assert_problem(response, 404, "not-found")


async def test_two_disk_sources(api: httpx.AsyncClient, tmp_path: Path) -> None:
    response = await api.post(f"{API}/vms", json={"name": "web", "new_disk": "16M",
                                                  "disk": str(tmp_path / "disks" / "x")})
    assert_problem(response, 400, "invalid-input")


async def test_unknown_image(api: httpx.AsyncClient) -> None:
    response = await api.post(f"{API}/vms", json={"name": "web", "image": "nope"})
    problem = assert_problem(response, 404, "not-found")
    assert problem["image"] == "nope"


async def test_bad_stop_request(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    for body in ({"mode": "yank"}, {"timeout_seconds": -1}, {"timeout_seconds": 99999},
                 {"extra": 1}):
        assert_problem(await api.post(f"{API}/vms/web/stop", json=body), 400, "invalid-input")
    assert (await show_vm(api, "web"))["state"] == "Running"


async def test_bad_update(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    for body in ({"memory": "lots"}, {"cpus": 0}, {"name": ""}, {"name": "a/b"},
                 {"unknown": True}, {"accelerator": "xen"}):
        assert_problem(await api.patch(f"{API}/vms/web", json=body), 400, "invalid-input")
    assert (await show_vm(api, "web"))["name"] == "web"


# -- 422: more than the host has -----------------------------------------------------------


async def test_more_memory_than_the_host_has(api: httpx.AsyncClient) -> None:
    problem = assert_problem(await api.post(f"{API}/vms", json={"name": "web",
                                                                 "memory": "64T"}),
                             422, "insufficient-resources")
    assert "more than this host has" in problem["detail"]


@pytest.fixture
def four_cpus(service: HostService) -> HostService:
    """The host's facts are the test's, not the machine's that runs it."""
    from dataclasses import replace

    service.facts = replace(service.facts, cpus=4)
    return service


async def test_more_cpus_than_the_host_has(api: httpx.AsyncClient,
                                           four_cpus: HostService) -> None:
    response = await api.post(f"{API}/vms", json={"name": "web", "cpus": 5})
    problem = assert_problem(response, 422, "insufficient-resources")
    assert problem["detail"] == ("processor count 5 is out of range; this host allows 1 to 4")
    assert problem["value"] == 5


async def test_more_cpus_than_any_vm_may_have(api: httpx.AsyncClient,
                                              four_cpus: HostService) -> None:
    from hvstack.compute.model import MAX_CPUS

    response = await api.post(f"{API}/vms", json={"name": "web", "cpus": MAX_CPUS + 1})
    problem = assert_problem(response, 400, "invalid-input")
    assert "processor count" in problem["detail"]


async def test_absurd_memory_is_a_400(api: httpx.AsyncClient) -> None:
    response = await api.post(f"{API}/vms", json={"name": "web", "memory": "9" * 400})
    assert_problem(response, 400, "invalid-input")


# -- 404 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/vms/ghost"),
    ("PATCH", "/vms/ghost"),
    ("DELETE", "/vms/ghost"),
    ("POST", "/vms/ghost/start"),
    ("POST", "/vms/ghost/stop"),
    ("POST", "/vms/ghost/save"),
    ("POST", "/vms/ghost/restart"),
    ("POST", "/vms/ghost/pause"),
    ("POST", "/vms/ghost/resume"),
    ("GET", "/vms/ghost/console-log"),
])
async def test_unknown_vm(api: httpx.AsyncClient, method: str, path: str) -> None:
    body = {"notes": "x"} if method == "PATCH" else None
    response = await api.request(method, f"{API}{path}", json=body)
    problem = assert_problem(response, 404, "not-found")
    assert problem["vm"] == "ghost"
    assert "no VM named 'ghost'" in problem["detail"]


async def test_unknown_job(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get(f"{API}/jobs/nope"), 404, "not-found")
    assert_problem(await api.post(f"{API}/jobs/nope/cancel"), 404, "not-found")


async def test_unknown_route_is_problem_json(api: httpx.AsyncClient) -> None:
    response = await api.get(f"{API}/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    response = await api.put(f"{API}/vms")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"


# -- 500: failures of the host itself ------------------------------------------------------


async def test_missing_ovmf_firmware_is_a_clear_problem(tmp_path: Path) -> None:
    from dataclasses import replace

    from hvstack.api.app import create_app
    from hvstack.host.facts import FixedHost
    from hvstack.host.root import HostRoot
    from hvstack.host.store import MemoryStore
    from tests.functional.conftest import make_config
    from tests.functional.fakes import FakeDriver

    config = replace(make_config(tmp_path), ovmf_vars=tmp_path / "no-such-OVMF_VARS.fd")
    service = HostService(config, MemoryStore(), FakeDriver(), FixedHost())
    await service.startup()
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
            response = await client.post(f"{API}/vms", json={"name": "web", "memory": "64M"})
        assert response.headers["content-type"] == "application/problem+json"
        assert "OVMF" in response.json()["detail"]
    finally:
        await service.shutdown()
        assert list(config.vms_dir.iterdir()) == []  # nothing left behind either way
