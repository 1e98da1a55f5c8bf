"""Input the API refuses at its boundary: lone surrogates, oversized bodies; and 500s
that carry an error id instead of the exception's text."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.host.config import HostConfig
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.conftest import make_config
from tests.functional.fakes import API, assert_problem, create_vm, show_vm

LIMIT = 4096


@pytest.fixture
def host_config(tmp_path: Path) -> HostConfig:
    return make_config(tmp_path, max_request_body=LIMIT)


# -- lone surrogates -------------------------------------------------------------------------

SURROGATE = "\\ud800"  # as JSON spells it


@pytest.mark.parametrize(("method", "path", "raw"), [
    ("PATCH", "/vms/web", '{"notes": "a%sb"}'),
    ("PATCH", "/vms/web", '{"name": "w%s"}'),
    ("PUT", "/vms/web/dvd", '{"iso": "/data/x%s.iso"}'),
    ("POST", "/vms/web/disks", '{"path": "/disks/d%s.qcow2"}'),
    ("PUT", "/vms/web/kvp", '{"key": "k%s", "value": "v"}'),
    ("PUT", "/vms/web/kvp", '{"key": "k", "value": "v%s"}'),
    ("POST", "/vms", '{"name": "x", "notes": "%s"}'),
    ("POST", "/disks", '{"path": "/disks/a%s.qcow2", "size": "1M"}'),
    ("PATCH", "/vms/web", '{"notes%s": "x"}'),  # in a key
    ("POST", "/vms/web/exec", '{"command": ["echo", "%s"]}'),  # deep in a list
])
async def test_a_lone_surrogate_is_a_400_and_nothing_changes(
    api: httpx.AsyncClient, method: str, path: str, raw: str,
) -> None:
    await create_vm(api, "web", notes="before")
    before = await show_vm(api, "web")
    response = await api.request(method, f"{API}{path}", content=raw % SURROGATE,
                                 headers={"content-type": "application/json"})
    problem = assert_problem(response, 400, "invalid-input")
    assert "surrogate" in problem["detail"]
    assert await show_vm(api, "web") == before
    assert [vm["name"] for vm in (await api.get(f"{API}/vms")).json()] == ["web"]


async def test_a_surrogate_in_raw_bytes_is_a_400(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", notes="before")
    body = b'{"notes": "a\xed\xa0\x80b"}'  # CESU-8: json.loads would make it \ud800
    response = await api.patch(f"{API}/vms/web", content=body,
                               headers={"content-type": "application/json"})
    assert_problem(response, 400, "invalid-input")
    assert (await show_vm(api, "web"))["notes"] == "before"


async def test_a_surrogate_pair_is_a_character(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    response = await api.patch(f"{API}/vms/web", content='{"notes": "\\ud83d\\ude00"}',
                               headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert (await show_vm(api, "web"))["notes"] == "\N{GRINNING FACE}"


async def test_a_body_nested_too_deeply_is_a_400(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    body = "[" * 1500 + '"\\u00e9"' + "]" * 1500  # deeper than Python's parser goes
    response = await api.patch(f"{API}/vms/web", content=body,
                               headers={"content-type": "application/json"})
    assert_problem(response, 400, "invalid-input")


# -- body limits -----------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_by_its_length(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web", notes="before")
    body = '{"notes": "' + "x" * LIMIT + '"}'
    problem = assert_problem(await api.patch(f"{API}/vms/web", content=body,
                                             headers={"content-type": "application/json"}),
                             413, "too-large")
    assert problem["limit"] == LIMIT
    assert str(LIMIT) in problem["detail"]
    assert (await show_vm(api, "web"))["notes"] == "before"


async def test_a_streamed_body_over_the_limit_is_413_without_reading_it_all(
    api: httpx.AsyncClient,
) -> None:
    await create_vm(api, "web", notes="before")
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"notes": "'
        for _ in range(1000):  # 1 MB offered; the guard stops at the limit
            sent += 1000
            yield b"x" * 1000

    response = await api.patch(f"{API}/vms/web", content=endless(),
                               headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "too-large")
    assert (await show_vm(api, "web"))["notes"] == "before"


async def test_a_body_at_the_limit_is_accepted(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    overhead = len('{"notes": ""}')
    response = await api.patch(f"{API}/vms/web",
                               content='{"notes": "' + "y" * (LIMIT - overhead) + '"}',
                               headers={"content-type": "application/json"})
    # Past the guard: the notes' own limit (4000 characters) decides.
    assert response.status_code in (200, 400)
    assert "too-large" not in response.text


async def test_the_upload_route_streams_past_the_json_limit(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    response = await api.put(f"{API}/vms/web/files/no-such-transfer",
                             content=b"z" * (LIMIT * 4))
    assert response.status_code != 413
    assert_problem(response, 404, "not-found")


# -- 500s ------------------------------------------------------------------------------------


async def test_an_unexpected_error_shows_an_error_id_not_its_text(
    service: HostService, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(ref: str) -> None:
        raise RuntimeError("secret at /proc/self/fd/7")

    monkeypatch.setattr(service, "get_vm", broken)
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)), raise_app_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="hvstack.api.problems"):
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
            response = await client.get(f"{API}/vms/web")
    problem = assert_problem(response, 500, "internal")
    assert "secret" not in response.text and "/proc" not in response.text
    error_id = problem["error_id"]
    assert error_id in problem["detail"]
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None and "secret" in str(record.exc_info[1])


async def test_a_hypervisor_error_carries_an_error_id(
    service: HostService, caplog: pytest.LogCaptureFixture,
) -> None:
    from hvstack.errors import HypervisorError

    async def broken(ref: str) -> None:
        raise HypervisorError("QEMU refused stop: no")

    service.pause_vm = broken  # type: ignore[method-assign, assignment]
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
        response = await client.post(f"{API}/vms/web/pause")
    problem = assert_problem(response, 500, "hypervisor-error")
    assert problem["detail"] == "QEMU refused stop: no"
    assert any(problem["error_id"] in r.getMessage() for r in caplog.records)


def test_the_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hvstack.host.config import load_config

    assert make_config(tmp_path).max_request_body == 1024 * 1024
    assert load_config(str(tmp_path)).max_request_body == 1024 * 1024
    monkeypatch.setenv("HV_MAX_REQUEST_BODY", "4M")
    assert load_config(str(tmp_path)).max_request_body == 4 * 1024 * 1024
