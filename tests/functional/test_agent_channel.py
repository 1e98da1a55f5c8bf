"""The guest agent client over a scripted channel: a call cancelled while its reply is
still on the way must not hand that reply to the next call."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hvstack.hypervisor.qemu.agent import GuestAgent


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
