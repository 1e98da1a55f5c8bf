"""Jobs (list, show, cancel) and the server-sent event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, MutableMapping
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    eventually,
    run_job,
    show_vm,
)


async def test_job_list_and_show(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    start = await run_job(api, "web", "start")
    stop = await run_job(api, "web", "stop", {"mode": "turn-off"})
    jobs = (await api.get(f"{API}/jobs")).json()
    assert [(j["id"], j["kind"], j["state"]) for j in jobs] == [
        (start["id"], "start", "completed"), (stop["id"], "turn-off", "completed")]
    shown = (await api.get(f"{API}/jobs/{start['id']}")).json()
    assert shown == start
    assert shown["target"] == "web"
    assert shown["error"] is None
    assert shown["finished_at"] >= shown["created_at"]


async def test_show_with_wait_returns_a_finished_job(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    job = (await api.post(f"{API}/vms/web/start")).json()
    shown = (await api.get(f"{API}/jobs/{job['id']}", params={"wait": 5})).json()
    assert shown["state"] == "completed"
    assert_problem(await api.get(f"{API}/jobs/{job['id']}", params={"wait": 61}), 400,
                   "invalid-input")


async def test_cancel_a_start(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    driver.launch_gate = asyncio.Event()  # the start hangs in launch
    await create_vm(api, "web")
    job = (await api.post(f"{API}/vms/web/start")).json()
    await asyncio.wait_for(driver.launching.wait(), 5)
    assert (await api.get(f"{API}/jobs/{job['id']}")).json()["state"] == "running"
    response = await api.post(f"{API}/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["error"]["type"] == "/problems/cancelled"
    assert cancelled["error"]["status"] == 409
    vm = await show_vm(api, "web")
    assert vm["state"] == "Off"
    assert vm["state_reason"] == "start failed: start was cancelled"
    assert driver.live_machines() == []
    # the VM is usable afterwards
    driver.launch_gate = None
    await run_job(api, "web", "start")


async def test_cancel_a_finished_job(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    job = await run_job(api, "web", "start")
    problem = assert_problem(await api.post(f"{API}/jobs/{job['id']}/cancel"), 409,
                             "conflict")
    assert problem["detail"] == (f"job {job['id']} (start of web) has already completed; "
                                 "only a running job can be cancelled")
    assert (await api.get(f"{API}/jobs/{job['id']}")).json()["state"] == "completed"


async def test_job_times_are_iso_8601_and_ids_take_a_prefix(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    job = await run_job(api, "web", "start")
    created = datetime.fromisoformat(job["created_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    assert created.utcoffset() == timedelta(0) and finished >= created
    assert job["duration_seconds"] == pytest.approx((finished - created).total_seconds(),
                                                    abs=0.002)
    assert job["message"] == ""
    shown = (await api.get(f"{API}/jobs/{job['id'][:5].upper()}")).json()
    assert shown["id"] == job["id"]
    problem = assert_problem(await api.get(f"{API}/jobs/zz"), 404, "not-found")
    assert problem["detail"] == "no job has an id that is or starts with 'zz'"


async def test_cancel_a_stop_keeps_the_vm_running(api: httpx.AsyncClient,
                                                  driver: FakeDriver) -> None:
    driver.ignore_power_button = True
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    job = (await api.post(f"{API}/vms/web/stop", json={"timeout_seconds": 600})).json()
    machine = driver.machine_of(vm["id"])
    await eventually(lambda: machine.power_presses > 0, "the power button was pressed")
    cancelled = (await api.post(f"{API}/jobs/{job['id']}/cancel")).json()
    assert cancelled["state"] == "cancelled"
    shown = await show_vm(api, "web")
    assert shown["state"] == "Running"
    assert machine.alive


# -- the event stream ----------------------------------------------------------------------


class SseClient:
    """Drives the ASGI app directly: httpx's ASGITransport buffers whole responses, so it
    cannot read an endless stream."""

    def __init__(self, service: HostService) -> None:
        self.app = create_app(HostRoot(service))
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self.start: MutableMapping[str, Any] = {}
        self.disconnect = asyncio.Event()
        self._requested = False
        self._buffer = b""
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            await self.chunks.put(message.get("body", b""))

    def open(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": f"{API}/events", "raw_path": f"{API}/events".encode(),
            "query_string": b"", "root_path": "",
            "headers": [(b"host", b"hv"), (b"accept", b"text/event-stream")],
            "client": ("127.0.0.1", 50000), "server": ("hv", 80),
        }
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))

    async def message(self, timeout: float = 5.0) -> dict[str, str]:
        """The next SSE message (comments included, as {"comment": ...})."""
        while b"\n\n" not in self._buffer:
            self._buffer += await asyncio.wait_for(self.chunks.get(), timeout)
        raw, self._buffer = self._buffer.split(b"\n\n", 1)
        fields: dict[str, str] = {}
        for line in raw.decode().splitlines():
            name, _, value = line.partition(":")
            fields[name or "comment"] = value.strip()
        return fields

    async def close(self) -> None:
        self.disconnect.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task


@pytest.fixture
async def sse(service: HostService) -> AsyncIterator[SseClient]:
    client = SseClient(service)
    client.open()
    try:
        yield client
    finally:
        await client.close()


async def subscribed(sse: SseClient, service: HostService) -> None:
    """Wait (bounded) until the stream delivers events: publish pings until one arrives."""
    first = await sse.message()
    assert first == {"comment": "hvstack events"}
    assert sse.start["status"] == 200
    assert dict(sse.start["headers"])[b"content-type"].startswith(b"text/event-stream")
    for _ in range(200):
        service.events.publish("test.ping")
        try:
            message = await sse.message(timeout=0.05)
        except TimeoutError:
            continue
        if message.get("event") == "test.ping":
            return
    raise AssertionError("the event stream never delivered an event")


async def events_until(sse: SseClient, done: Any, limit: int = 200) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for _ in range(limit):
        message = await sse.message()
        if "data" not in message:
            continue
        data = json.loads(message["data"])
        assert data["type"] == message["event"]
        seen.append(data)
        if done(data):
            return seen
    raise AssertionError(f"no matching event in {seen}")


async def test_events_show_a_vm_starting(api: httpx.AsyncClient, service: HostService,
                                         sse: SseClient) -> None:
    await subscribed(sse, service)
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    seen = await events_until(sse, lambda e: e["type"] == "vm.state" and
                              e["state"] == "Running")
    created = [e for e in seen if e["type"] == "vm.created"]
    assert created and created[0]["vm"] == "web" and created[0]["id"] == vm["id"]
    states = [e["state"] for e in seen if e["type"] == "vm.state"]
    assert states[-2:] == ["Starting", "Running"]
    jobs = [e for e in seen if e["type"] == "job"]
    assert jobs and jobs[0]["kind"] == "start" and jobs[0]["target"] == "web"
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs)


async def test_events_show_a_deletion(api: httpx.AsyncClient, service: HostService,
                                      sse: SseClient) -> None:
    await create_vm(api, "web")
    await subscribed(sse, service)
    await api.delete(f"{API}/vms/web")
    seen = await events_until(sse, lambda e: e["type"] == "vm.deleted")
    assert seen[-1]["vm"] == "web"

