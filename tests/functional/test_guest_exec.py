"""``POST /vms/{ref}/exec`` and ``hv vm exec`` against a fake guest agent: exit codes,
output, input, truncation, timeouts that kill, a hung agent, garbage on the channel."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.functional.fakes import API, assert_problem, create_vm, eventually
from tests.functional.guest_cli import hv

if TYPE_CHECKING:
    from hvstack.integration.ops import GuestOperations
    from tests.functional.guest_support import Guests

pytest_plugins = ("tests.functional.guest_support",)


async def run(api: httpx.AsyncClient, name: str, *command: str, **body: object
              ) -> httpx.Response:
    return await api.post(f"{API}/vms/{name}/exec", json={"command": list(command), **body})


async def test_exit_codes_output_and_input(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    await guests.boot("g1")
    reply = await run(guest_api, "g1", "echo", "hello", "world")
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert (result["exit_code"], result["signal"], result["stdout"], result["stderr"],
            result["encoding"], result["truncated"]) == (0, None, "hello world\n", "", "utf-8",
                                                         False)

    result = (await run(guest_api, "g1", "sh", "-c", "echo out; echo err >&2; exit 3")).json()
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "out\n", "err\n")

    result = (await run(guest_api, "g1", "sh", "-c", "kill -9 $$")).json()
    assert (result["exit_code"], result["signal"]) == (None, 9)

    data = bytes(range(256)) * 4
    result = (await run(guest_api, "g1", "cat", input=base64.b64encode(data).decode())).json()
    assert result["encoding"] == "base64"
    assert base64.b64decode(result["stdout"]) == data

    result = (await run(guest_api, "g1", "sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x",
                        max_output_bytes=1000)).json()
    assert (result["stdout"], result["truncated"], result["stdout_truncated"]) == (
        "x" * 1000, True, True)


async def test_errors(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    await guests.boot("g1")
    missing = assert_problem(await run(guest_api, "g1", "no-such-program"), 422,
                             "guest-command-failed")
    assert missing["detail"] == ("cannot run 'no-such-program' in VM 'g1': Failed to execute "
                                 "child process “no-such-program” (No such file or directory)")
    assert_problem(await run(guest_api, "g1"), 400, "invalid-input")
    assert_problem(await run(guest_api, "g1", "cat", input="not base64!"), 400, "invalid-input")
    assert_problem(await run(guest_api, "ghost", "true"), 404, "not-found")
    await create_vm(guest_api, "off")
    off = assert_problem(await run(guest_api, "off", "true"), 409, "invalid-state")
    assert off["required"] == ["Running"]
    assert off["detail"] == "cannot run a command in VM 'off' while it is Off: start it first"


def _marker() -> str:
    """A sleep length no other process on the host has in its command line (the fake
    agent runs real host processes, and other test runs may run at the same time)."""
    return f"3000.{secrets.randbelow(10**9):09d}"


def _alive_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in entry.read_bytes():
                found.append(int(entry.parent.name))
        except OSError:
            continue
    return found


async def test_timeout_kills_the_process_tree(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    await guests.boot("g1")
    # A shell with a child in the background and one in the foreground: both must go.
    first, second = _marker(), _marker()
    script = f"sleep {first} & sleep {second}; echo never"
    reply = await run(guest_api, "g1", "sh", "-c", script, timeout_seconds=0.5)
    problem = assert_problem(reply, 504, "timeout")
    assert problem["killed"] is True
    assert "did not finish within 0.5 s" in problem["detail"]
    await eventually(lambda: not _alive_with(first) and not _alive_with(second),
                     "the guest processes are gone")


async def test_cancelled_request_kills_the_program(guest_ops: GuestOperations,
                                                   guests: Guests) -> None:
    await guests.boot("g1")
    marker = _marker()
    task = asyncio.create_task(guest_ops.exec("g1", ["sleep", marker], timeout=60))
    await eventually(lambda: bool(_alive_with(marker)), "the program runs")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: not _alive_with(marker), "the program was killed")


async def test_hung_agent_times_out_and_other_vms_still_answer(
        guest_api: httpx.AsyncClient, guests: Guests) -> None:
    hung = await guests.boot("hung")
    hung.hang = hung.garbage = True  # junk on the channel, then nothing
    await guests.boot("fine")
    stuck = asyncio.create_task(run(guest_api, "hung", "true"))
    other = await run(guest_api, "fine", "echo", "still here")
    assert other.json()["stdout"] == "still here\n"
    assert (await guest_api.get(f"{API}/vms")).status_code == 200
    problem = assert_problem(await stuck, 409, "guest-agent-unavailable")
    assert problem["vm"] == "hung"
    assert "did not answer" in problem["detail"]
    # It comes back once the agent answers again.
    hung.hang = False
    assert (await run(guest_api, "hung", "echo", "back")).json()["stdout"] == "back\n"


async def test_garbage_on_the_channel_is_skipped(guest_api: httpx.AsyncClient,
                                                 guests: Guests) -> None:
    fake = await guests.boot("g1")
    fake.garbage = True
    result = (await run(guest_api, "g1", "echo", "clean")).json()
    assert (result["exit_code"], result["stdout"]) == (0, "clean\n")



async def test_cli_exec(guest_served: str, guests: Guests, tmp_path: Path) -> None:
    await guests.boot("g1")
    result = await hv(guest_served, "vm", "exec", "g1", "--", "sh", "-c",
                      "echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")

    result = await hv(guest_served, "vm", "exec", "g1", "-o", "json", "--", "sh", "-c", "exit 2")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["exit_code"] == 2

    source = tmp_path / "input.txt"
    source.write_text("from a file\n")
    result = await hv(guest_served, "vm", "exec", "g1", "--input", str(source), "--", "cat")
    assert (result.exit_code, result.stdout) == (0, "from a file\n")
    result = await hv(guest_served, "vm", "exec", "g1", "--input", "-", "--", "wc", "-c",
                      stdin="12345")
    assert result.stdout.strip() == "5"

    result = await hv(guest_served, "vm", "exec", "g1", "--", "sh", "-c", "kill -TERM $$")
    assert result.exit_code == 128 + 15

    result = await hv(guest_served, "vm", "exec", "g1", "--", "no-such-program")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot run 'no-such-program'")

    result = await hv(guest_served, "vm", "exec", "g1", "--timeout", "0.3", "--", "sleep", "3034")
    assert result.exit_code == 2
    assert "did not finish within 0.3 s" in result.stderr


def test_exec_kill_script_parses() -> None:
    from hvstack.integration.guest_io import KILL_TREE

    for shell in ("sh", "busybox"):
        argv = ["busybox", "sh", "-n"] if shell == "busybox" else ["sh", "-n"]
        if shell == "busybox" and not any(
                os.access(os.path.join(p, "busybox"), os.X_OK)
                for p in os.environ.get("PATH", "").split(":")):
            continue
        import subprocess

        subprocess.run(argv, input=KILL_TREE.encode(), check=True, timeout=10)


async def test_output_beyond_the_read_limit_is_truncated_not_fatal(
        guest_api: httpx.AsyncClient, guests: Guests) -> None:
    """qemu-ga keeps up to 16 MiB of each stream; both full still fit the agent client."""
    await guests.boot("g1")
    script = "head -c 17000000 /dev/zero; head -c 17000000 /dev/zero >&2"
    result = (await run(guest_api, "g1", "sh", "-c", script, max_output_bytes=1000)).json()
    assert (result["exit_code"], len(result["stdout"]), len(result["stderr"])) == (0, 1000,
                                                                                  1000)
    assert result["stdout_truncated"] and result["stderr_truncated"]
