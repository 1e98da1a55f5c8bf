"""What users and guests wrote is printed as text: never Rich markup, never a terminal
escape sequence; JSON keeps it exactly."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli import render
from hvstack.cli.main import app
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import serve_on_unix_socket

runner = CliRunner()

NOTES = {
    "[/x]": "[/x]",  # a closing tag with no opening one: MarkupError before
    "[link=http://x]y": "[link=http://x]y",  # was a hyperlink
    "[bold red]loud[/]": "[bold red]loud[/]",
    "\x1b[31mred\x1b[0m": "\\x1b[31mred\\x1b[0m",  # reached the terminal as it was
    "bell\x07 and\rcarriage": "bell\\x07 and\\rcarriage",
    "bidi \u202eevil": "bidi \\u202eevil",
    ":smile: 100%": ":smile: 100%",  # no emoji codes either
}


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args),
                                   env={"HV_HOST": host, "COLUMNS": "300"})


@pytest.mark.parametrize(("notes", "shown"), NOTES.items())
async def test_notes_are_shown_as_text(served: str, notes: str, shown: str) -> None:
    result = await hv(served, "vm", "create", "web", "--notes", notes)
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "show", "web")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("notes"))
    assert line.split(None, 1)[1].rstrip() == shown
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    result = await hv(served, "vm", "show", "web", "-o", "json")
    assert json.loads(result.stdout)["notes"] == notes


@pytest.mark.parametrize("name", ["[red]x", "[link=x]y", "a]b[c", ":smile:", "[bold]"])
async def test_names_are_shown_as_text_in_tables_and_messages(served: str, name: str) -> None:
    result = await hv(served, "vm", "create", name)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Created VM '{name}' (Generation 2, ")
    result = await hv(served, "vm", "list")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[0] == name
    result = await hv(served, "vm", "start", name)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Starting {name}: done, VM is Running"
    result = await hv(served, "job", "list")
    assert name in result.stdout


@pytest.mark.parametrize("ref", ["[red]x", "[link=x]y", "x\x1b[2Jy"])
async def test_error_messages_are_text(served: str, ref: str) -> None:
    result = await hv(served, "vm", "show", ref)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    shown = ref.replace("\x1b", "\\x1b")
    assert result.stderr.strip() == f"error: no VM named '{shown}' exists on this host"


async def test_an_error_about_a_path_with_brackets(served: str, tmp_path: Path) -> None:
    """A server message holding '[/x]' (a path, a qemu-img message) crashed hv before."""
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    disk = tmp_path / "disks" / "[/x]"
    result = await hv(served, "vm", "set", "web", "--attach-disk", str(disk))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and str(disk) in result.stderr


def test_fail_prints_text() -> None:
    result = runner.invoke(app, ["vm", "set", "web", "--enable", "[/oops]"],
                           env={"HV_HOST": "unix:/nonexistent.sock"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: '[/oops]' is not an integration service")


def test_a_terminal_gets_no_hyperlink_and_no_foreign_escape(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """On a real terminal (colours on) only hv's own styles are escape sequences."""
    out = io.StringIO()
    terminal = render.PlainConsole(file=out, force_terminal=True, color_system="truecolor",
                                   width=200)
    monkeypatch.setattr(render, "console", terminal)
    render.details({"notes": "[link=http://x]y \x1b[31mred", "name": "[bold]n[/bold]"})
    render.table([{"name": "[red]x[/red]\x1b]8;;http://evil\x1b\\"}], [("name", "Name")])
    terminal.print("printed: [link=http://x]y\x1b[2J")
    text = out.getvalue()
    assert "\x1b]8;" not in text  # OSC 8: a hyperlink
    assert "\x1b[31m" not in text and "\x1b[2J" not in text
    assert "[link=http://x]y \\x1b[31mred" in text
    assert "[bold]n[/bold]" in text
    assert "[red]x[/red]\\x1b]8;;http://evil\\x1b\\" in text
    assert "printed: [link=http://x]y\\x1b[2J" in text


def test_escape_controls() -> None:
    assert render.escape_controls("a\x00b\x7fc\x9bd") == "a\\x00b\\x7fc\\x9bd"
    assert render.escape_controls("tab\there\nnl") == "tab\\there\\nnl"
    assert render.escape_controls("one\ntwo\x1b", keep_newlines=True) == "one\ntwo\\x1b"
    assert render.escape_controls("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    assert render.escape_controls("ünïcødé 名前 👍") == "ünïcødé 名前 👍"


class _FakeApi:
    """Stands in for the client: reports one progress step with hostile text."""

    def wait_job(self, job: dict[str, object], update: object = None) -> dict[str, object]:
        assert callable(update)
        update({"progress": 50.0, "message": "copying [/x] [link=http://x]y \x1b[2J"})
        return {**job, "state": "completed"}


def test_progress_bars_show_text(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    terminal = render.PlainConsole(file=out, force_terminal=True, color_system="truecolor",
                                   width=200, stderr=True)
    monkeypatch.setattr(render, "err_console", terminal)
    job = render.follow_job(_FakeApi(), {"id": "j", "state": "running"},  # type: ignore[arg-type]
                            "Converting [/y]\x1b]8;;http://evil\x1b\\")
    assert job["state"] == "completed"
    text = out.getvalue()
    assert "\x1b]8;" not in text and "\x1b[2J" not in text
    assert "Converting [/y]\\x1b]8;;http://evil\\x1b\\" in text
    assert "copying [/x] [link=http://x]y \\x1b[2J" in text


def test_details_fold_a_long_path_instead_of_cutting_it(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    out = io.StringIO()
    monkeypatch.setattr(render, "console", render.PlainConsole(file=out, width=40))
    path = "/srv/hvstack/vms/00698e8d-61c8-493d-9258-ac872612ee0c/disk0.qcow2"
    render.details({"disk": path, "created_at": 0})
    assert "…" not in out.getvalue()
    assert path in "".join(out.getvalue().split())  # folded over lines, but whole
