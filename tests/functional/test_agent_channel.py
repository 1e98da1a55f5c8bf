"""The guest agent client over a scripted channel: a call cancelled while its reply is
still on the way must not hand that reply to the next call; a large reply that keeps
coming is read to its end past the call's timeout, one that trickles in times out."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hvstack.hypervisor.qemu.agent import AgentUnavailable, GuestAgent


async def test_a_cancelled_call_leaves_no_stale_reply(tmp_path: Path) -> None:
    release, asked = asyncio.Event(), asyncio.Event()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line.lstrip(b"\xff"))
            command = request["execute"]
            if command == "guest-sync-delimited":
                reply = {"return": request["arguments"]["id"]}
                writer.write(b"\xff" + json.dumps(reply).encode() + b"\n")
            elif command == "slow":
                asked.set()
                await release.wait()  # answers only after the caller gave up
                writer.write(json.dumps({"return": "slow"}).encode() + b"\n")
            else:
                writer.write(json.dumps({"return": command}).encode() + b"\n")
            await writer.drain()
        writer.close()

    path = str(tmp_path / "qga.sock")
    server = await asyncio.start_unix_server(agent, path)
    client = GuestAgent(path, "vm")
    try:
        assert await client.call("first") == "first"
        slow = asyncio.create_task(client.call("slow"))
        await asyncio.wait_for(asked.wait(), 30)  # the request is on the channel
        slow.cancel()
        release.set()
        await asyncio.gather(slow, return_exceptions=True)
        assert await client.call("fast", timeout=30) == "fast"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def _serve_replies(tmp_path: Path, answer: Callable[[asyncio.StreamWriter],
                                                           Awaitable[None]]
                         ) -> tuple[asyncio.Server, GuestAgent]:
    """An agent that syncs, then answers every other command with ``answer``."""

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                request = json.loads(line.lstrip(b"\xff"))
                if request["execute"] == "guest-sync-delimited":
                    reply = {"return": request["arguments"]["id"]}
                    writer.write(b"\xff" + json.dumps(reply).encode() + b"\n")
                else:
                    await answer(writer)
                await writer.drain()
        writer.close()

    path = str(tmp_path / "qga.sock")
    return await asyncio.start_unix_server(agent, path), GuestAgent(path, "vm")


async def test_a_large_reply_that_keeps_coming_is_read_past_the_timeout(
        tmp_path: Path) -> None:
    """The timeout bounds the wait for an answer, not the transfer of a big one (a
    guest-exec-status with 2 x 16 MiB of output on a busy host)."""
    piece = b"x" * (256 * 1024)
    parts = 16

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": "')
        for _ in range(parts):  # slower in all than the caller's timeout
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b'"}\n')

    server, client = await _serve_replies(tmp_path, answer)
    try:
        reply = await client.call("big", timeout=0.3)
        assert len(reply) == parts * len(piece)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_reply_that_trickles_in_still_times_out(tmp_path: Path) -> None:
    done = asyncio.Event()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": "')
        while not done.is_set():  # a few bytes now and then: never the whole reply
            writer.write(b"xx")
            await writer.drain()
            await asyncio.sleep(0.05)

    server, client = await _serve_replies(tmp_path, answer)
    try:
        with pytest.raises(AgentUnavailable, match=r"did not answer slow within 0\.3 s"):
            await client.call("slow", timeout=0.3)
    finally:
        done.set()
        await asyncio.sleep(0.1)  # the trickle ends
        await client.close()
        server.close()
        await server.wait_closed()
