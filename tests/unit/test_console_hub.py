"""The serial console hub against a fake QEMU serial socket: fan-out, one writer, roles,
reconnecting, slow viewers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hvstack.host.console_hub import AttachMode, ConsoleHub, Role
from tests.fake_serial import WAIT, FakeSerialPort, ViewerLog


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[FakeSerialPort]:
    fake = FakeSerialPort(tmp_path / "run" / "serial.sock")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def hub(port: FakeSerialPort) -> AsyncIterator[ConsoleHub]:
    console = ConsoleHub("vm1", port.path, retry=0.01, settle=0.02)
    yield console
    await console.close()


async def test_output_reaches_every_viewer_and_only_the_writer_types(
        hub: ConsoleHub, port: FakeSerialPort) -> None:
    first, second = ViewerLog(hub.attach()), ViewerLog(hub.attach())
    assert (await first.notice("attached")).role is Role.WRITER
    attached = await second.notice("attached")
    assert attached.role is Role.READER
    assert "viewer 1" in attached.detail and "force" in attached.detail
    await first.notice("connected")
    await second.notice("connected")
    assert port.connections == 1  # one connection to QEMU, however many viewers

    port.say(b"login banner\r\n")
    await first.text(b"login banner")
    await second.text(b"login banner")

    assert await second.viewer.write(b"echo ignored\r") is False
    assert (await second.notice("input-ignored")).role is Role.READER
    assert await second.viewer.write(b"echo again\r") is False  # told only once
    assert await first.viewer.write(b"echo hello-42\r") is True
    await first.text(b"hello-42\r\n")
    await second.text(b"hello-42\r\n")
    assert port.received == b"echo hello-42\r"
    assert second.events() == []


async def test_the_writer_role_passes_on_in_attach_order(hub: ConsoleHub) -> None:
    first = hub.attach()
    watcher = ViewerLog(hub.attach(AttachMode.READ_ONLY))
    second, third = ViewerLog(hub.attach()), ViewerLog(hub.attach())
    first.detach()
    role = await second.notice("role")
    assert role.role is Role.WRITER and "viewer 1 left" in role.detail
    assert hub.writer() is second.viewer
    second.viewer.detach()
    assert (await third.notice("role")).role is Role.WRITER
    third.viewer.detach()
    # a read-only viewer never gets the input, even when it is the only one left
    assert hub.writer() is None
    assert watcher.viewer.role is Role.READER
    assert "role" not in [n.event for n in watcher.notices]


async def test_force_takes_the_input_and_gives_it_back(hub: ConsoleHub,
                                                       port: FakeSerialPort) -> None:
    first = ViewerLog(hub.attach())
    await first.notice("connected")
    forcer = ViewerLog(hub.attach(AttachMode.FORCE))
    assert (await forcer.notice("attached")).role is Role.WRITER
    demoted = await first.notice("role")
    assert demoted.role is Role.READER and "took over" in demoted.detail
    assert await first.viewer.write(b"x") is False
    assert await forcer.viewer.write(b"echo forced\r") is True
    await first.text(b"forced\r\n")
    forcer.viewer.detach()
    assert (await first.notice("role")).role is Role.WRITER
    assert await first.viewer.write(b"y") is True
    await first.text(b"y")
    assert port.received == b"echo forced\ry"


async def test_the_hub_reconnects_when_the_vm_restarts(hub: ConsoleHub,
                                                       port: FakeSerialPort) -> None:
    viewer = ViewerLog(hub.attach())
    await viewer.notice("connected")
    await port.stop()  # the VM stops: QEMU and its socket are gone
    assert "closed" in (await viewer.notice("disconnected")).detail
    assert await viewer.viewer.write(b"lost") is True
    assert "input dropped" in (await viewer.notice("input-dropped")).detail
    await port.start()  # the VM starts again: a new socket at the same path
    await viewer.notice("connected")
    port.say(b"second boot\r\n")
    await viewer.text(b"second boot")
    assert port.connections == 2
    assert b"lost" not in port.received
    assert viewer.viewer.attached


async def test_a_connection_that_closes_at_once_is_passed_over(port: FakeSerialPort) -> None:
    port.close_at_once = 2  # what an exiting QEMU does to the next client
    port.greeting = b"login: "  # the live one speaks at once: no need to wait out settle
    hub = ConsoleHub("vm1", port.path, retry=0.01, settle=WAIT)
    try:
        viewer = ViewerLog(hub.attach())
        await viewer.notice("connected")
        await viewer.text(b"login: ")
        assert port.close_at_once == 0 and port.connections == 1
        assert viewer.events() == ["attached"]  # nothing about the connections that failed
    finally:
        await hub.close()


async def test_attaching_before_the_vm_runs_waits_for_it(tmp_path: Path) -> None:
    port = FakeSerialPort(tmp_path / "serial.sock")
    hub = ConsoleHub("vm1", port.path, retry=0.01, settle=0.02)
    try:
        viewer = ViewerLog(hub.attach())
        assert "is the VM running" in (await viewer.notice("waiting")).detail
        late = ViewerLog(hub.attach(AttachMode.READ_ONLY))
        await late.notice("waiting")  # a viewer joining a waiting hub is told at once
        await port.start()
        await viewer.notice("connected")
        await late.notice("connected")
    finally:
        await hub.close()
        await port.stop()


async def test_the_last_viewer_leaving_closes_the_connection(port: FakeSerialPort) -> None:
    idle: list[ConsoleHub] = []
    hub = ConsoleHub("vm1", port.path, retry=0.01, settle=0.02, on_idle=idle.append)
    first, second = ViewerLog(hub.attach()), hub.attach()
    await first.notice("connected")
    await asyncio.wait_for(port.connected.wait(), WAIT)
    first.viewer.detach()
    assert port.connected.is_set() and not idle
    second.detach()
    await asyncio.wait_for(port.disconnected.wait(), WAIT)
    assert idle == [hub]
    assert await first.viewer.receive() is None  # a detached viewer's queue ends
    again = ViewerLog(hub.attach())  # and the hub can be used again
    await again.notice("connected")
    assert port.connections == 2
    await hub.close()
    assert again.viewer.closed_reason == "the host service is stopping"


async def test_a_viewer_that_does_not_keep_up_is_detached(port: FakeSerialPort) -> None:
    hub = ConsoleHub("vm1", port.path, retry=0.01, settle=0.02, max_pending=1000)
    try:
        slow = hub.attach()  # never reads
        fast = ViewerLog(hub.attach())
        await fast.notice("connected")
        for i in range(1, 21):
            port.say(b"x" * 100)
            await fast.text(b"x" * 100 * i)  # this one reads as it comes
        assert slow.closed_reason is not None and "too slow" in slow.closed_reason
        assert hub.viewers == [fast.viewer]
        assert (await fast.notice("role")).role is Role.WRITER  # the slow one was writer
    finally:
        await hub.close()


async def test_viewers_are_closed_when_the_vm_is_deleted(tmp_path: Path) -> None:
    exists = True
    hub = ConsoleHub("vm1", tmp_path / "serial.sock", retry=0.01, settle=0.02,
                     exists=lambda: exists)
    viewer = ViewerLog(hub.attach())
    await viewer.notice("waiting")
    exists = False
    assert "deleted" in (await viewer.notice("closed")).detail
    await viewer.end()
    assert hub.viewers == []
