"""The subprocess runner: output, input, timeouts and cancellation killing the whole
process group, error mapping, progress parsing and passing file descriptors."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from hvstack.errors import HvError, HypervisorError, InvalidInput, OperationTimeout
from hvstack.runner import ProgressParser, run

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _gone(pid: int) -> bool:
    for _ in range(500):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_returns_stdout_and_feeds_input() -> None:
    code = "import sys; sys.stdout.write(sys.stdin.read().upper())"
    assert await run([PY, "-c", code], timeout=30, input=b"hello") == b"HELLO"


async def test_a_failure_carries_the_tool_exit_code_and_stderr() -> None:
    code = "import sys; sys.stderr.write('disk on fire\\n'); sys.exit(3)"
    with pytest.raises(HypervisorError) as raised:
        await run([PY, "-c", code], timeout=30)
    assert raised.value.data["exit_code"] == 3
    assert raised.value.data["stderr"] == "disk on fire"
    assert "failed (exit 3): disk on fire" in raised.value.message


async def test_errors_are_mapped_by_the_caller() -> None:
    def errors(code: int, stderr: str) -> HvError:
        return InvalidInput(f"bad: {stderr} ({code})")

    code = "import sys; sys.stderr.write('unknown option'); sys.exit(1)"
    with pytest.raises(InvalidInput, match=r"bad: unknown option \(1\)"):
        await run([PY, "-c", code], timeout=30, errors=errors)
    assert await run([PY, "-c", "import sys; sys.exit(1)"], timeout=30, ok_codes=(0, 1)) == b""


async def test_a_missing_program_names_its_package() -> None:
    with pytest.raises(HypervisorError, match=r"mkfs\.nothing is not installed "
                                              r"\(apt-get install e2fsprogs\)"):
        await run(["/nonexistent/mkfs.nothing"], timeout=30, package="e2fsprogs")


def _spawner(pidfile: Path) -> list[str]:
    """A program that starts a grandchild in its group, records its pid, and waits."""
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(300)"
    )
    return [PY, "-c", code]


async def _grandchild(pidfile: Path) -> int:
    for _ in range(3000):
        if pidfile.exists() and pidfile.read_text():
            return int(pidfile.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError("the program did not start its child")


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    running = asyncio.create_task(run(_spawner(pidfile), timeout=3))
    grandchild = await _grandchild(pidfile)
    with pytest.raises(OperationTimeout, match=r"did not finish within 3 s; it was stopped"):
        await running
    assert await _gone(grandchild)


async def test_cancellation_kills_the_whole_process_group_and_propagates(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "child.pid"
    running = asyncio.create_task(run(_spawner(pidfile), timeout=300))
    grandchild = await _grandchild(pidfile)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await _gone(grandchild)


async def test_progress_is_parsed_from_stdout_as_it_arrives() -> None:
    code = ("import sys\n"
            "for p in ('10', 'x', '50', '40', '150'):\n"
            "    sys.stdout.write(p + '\\r'); sys.stdout.flush()\n")
    seen: list[tuple[float, str]] = []

    def parse(segment: str) -> float | None:
        return float(segment) if segment.isdigit() else None

    out = await run([PY, "-c", code], timeout=30, parse=parse,
                    progress=lambda p, m: seen.append((p, m)))
    assert out == b"10\rx\r50\r40\r150\r"
    assert seen == [(10.0, ""), (50.0, ""), (100.0, "")]


def test_progress_parser_joins_split_segments() -> None:
    parser = ProgressParser(lambda s: float(s) if s else None)
    assert parser.feed("1") == []
    assert parser.feed("2\n3") == [12.0]
    assert parser.close() == []  # 3 is below 12


async def test_passed_file_descriptors_keep_their_numbers() -> None:
    read_end, write_end = os.pipe()
    try:
        code = f"import os; os.write({write_end}, b'via fd')"
        await run([PY, "-c", code], timeout=30, pass_fds=[write_end])
        assert os.read(read_end, 100) == b"via fd"
    finally:
        os.close(read_end)
        os.close(write_end)
