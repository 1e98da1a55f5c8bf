"""``hv vm exec``, ``hv vm copy-file`` and ``hv vm kvp``: working inside a guest through
its agent, with no guest network.

``hv vm exec`` exits with the guest program's exit code (128 + N when signal N ended
it). hv's own errors exit with 2, as everywhere, so exit code 2 is ambiguous: ``-o json``
prints ``{exit_code, signal, stdout, stderr, truncated, ...}`` and exits 0 whenever the
program ran, and 2 only for hv's errors.

``hv vm copy-file`` sends the bytes of a local file through the host service (a copy
into the guest), or receives them into a local file (``--from-guest``), with a progress
bar on a terminal; the host service checks sha256 in the guest, and the client checks it
again on the bytes it sent or received. A download lands in a temporary file beside
its destination and is renamed only when complete and verified. The copy protocol is
the Python client's (:meth:`hvstack.client.Client.copy_to_guest`,
:meth:`~hvstack.client.Client.copy_from_guest`).
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    err_console,
    escape_controls,
    fail,
    print_json,
    table,
)
from hvstack.cli.vm import app
from hvstack.client import ByteProgress, url_path

REPLY_MARGIN = 60.0  # seconds the service may take beyond the guest program's timeout

kvp_app = typer.Typer(help="Exchange key-value pairs with the guest (Hyper-V's KVP).",
                      no_args_is_help=True)
app.add_typer(kvp_app, name="kvp")


# -- exec ------------------------------------------------------------------------------------


def _read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")


def _decode(result: dict[str, Any], key: str) -> bytes:
    text: str = result.get(key) or ""
    return base64.b64decode(text) if result.get("encoding") == "base64" else text.encode()


@app.command("exec")
def exec_(
    name: str,
    command: list[str] = typer.Argument(..., metavar="-- CMD [ARG]...",
                                        help="program and arguments (after --)"),
    timeout: float = typer.Option(300.0, "--timeout",
                                  help="seconds; then the program is killed"),
    input_file: str | None = typer.Option(None, "--input",
                                          help="file for the program's stdin ('-': stdin)"),
    max_output: int = typer.Option(1024 * 1024, "--max-output",
                                   help="bytes kept of stdout and of stderr each"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Run a program in the guest through its agent (PowerShell Direct's counterpart).

    Prints the program's stdout and stderr and exits with its exit code; hv's own
    errors exit with 2 (use -o json to tell them apart). Nothing streams: the output
    comes when the program has ended.
    """
    if timeout <= 0:
        fail("--timeout must be more than 0 seconds")
    body: dict[str, Any] = {"command": command, "timeout_seconds": timeout,
                            "max_output_bytes": max_output}
    if input_file is not None:
        body["input"] = base64.b64encode(_read_input(input_file)).decode()
    with client(host) as api:
        result = api.post(url_path("vms", name, "exec"), body, timeout=timeout + REPLY_MARGIN)
    if output is Output.json:
        print_json(result)
        return
    typer.echo(_decode(result, "stdout"), nl=False)
    typer.echo(_decode(result, "stderr"), nl=False, err=True)
    if result.get("truncated"):
        err_console.print(f"hv: output truncated to {max_output} bytes per stream",
                          highlight=False)
    signal = result.get("signal")
    raise typer.Exit(128 + int(signal) if signal is not None else int(result["exit_code"]))


# -- copy-file -------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(what: str) -> Iterator[ByteProgress]:
    """A byte progress bar on stderr when it is a terminal, shown from the copy's first
    progress call (which brings the size); yields the client's progress callback."""
    if not err_console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task: list[TaskID] = []

        def update(done: int, total: int) -> None:
            if not task:
                task.append(bar.add_task(escape_controls(what), total=total))
            bar.update(task[0], completed=done)

        yield update


@app.command("copy-file")
def copy_file(
    name: str,
    source: str = typer.Argument(..., help="local file (--to-guest) or guest path"),
    destination: str = typer.Argument(..., help="guest path (--to-guest) or local path"),
    to_guest: bool = typer.Option(True, "--to-guest/--from-guest",
                                  help="direction (default: into the guest)"),
    create_dirs: bool = typer.Option(False, "--create-dirs",
                                     help="make missing folders of the destination"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file"),
    output: Output = OutputOption,
    host: str | None = HostOption,
) -> None:
    """Copy a file into or out of a guest (Copy-VMFile); needs guest services enabled.

    Guest paths are absolute file paths. The copy is checked with sha256 on both sides;
    a failed copy leaves the destination as it was.
    """
    with client(host) as api:
        if to_guest:
            with _progress(f"{source} → {name}:{destination}") as progress:
                job = api.copy_to_guest(name, source, destination, create_dirs=create_dirs,
                                        overwrite=overwrite, progress=progress)
            result = job.get("result") or {}
            summary = (f"Copied {source} to {name}:{result.get('guest_path')} "
                       f"({result.get('size')} bytes, sha256 verified in the guest)")
            data: dict[str, Any] = job
        else:
            with _progress(f"{name}:{source} → {destination}") as progress:
                data = api.copy_from_guest(name, source, destination, create_dirs=create_dirs,
                                           overwrite=overwrite, progress=progress)
            summary = (f"Copied {name}:{data['guest_path']} to {data['path']} "
                       f"({data['size']} bytes, sha256 verified)")
    if output is Output.json:
        print_json(data)
    else:
        console.print(summary, highlight=False, soft_wrap=True)


# -- KVP ---------------------------------------------------------------------------------


def _change_line(name: str, change: dict[str, Any], verb: str) -> str:
    where = ("written into the guest" if change.get("pushed") else
             f"the guest gets it when its agent answers: {change.get('push_error')}")
    return f"{verb} '{change['key']}' on {name} ({where})"


@kvp_app.command("set")
def kvp_set(name: str, key: str, value: str, output: Output = OutputOption,
            host: str | None = HostOption) -> None:
    """Set a host-to-guest item (kept in the VM's settings, written into the guest)."""
    with client(host) as api:
        change = api.request("PUT", url_path("vms", name, "kvp"), json={"key": key, "value": value})
    print_json(change) if output is Output.json else console.print(
        _change_line(name, change, "Set"), highlight=False, soft_wrap=True)


@kvp_app.command("delete")
def kvp_delete(name: str, key: str, output: Output = OutputOption,
               host: str | None = HostOption) -> None:
    """Delete a host-to-guest item."""
    with client(host) as api:
        change = api.request("DELETE", url_path("vms", name, "kvp"), params={"key": key})
    print_json(change) if output is Output.json else console.print(
        _change_line(name, change, "Deleted"), highlight=False, soft_wrap=True)


def _pairs(pool: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(pool.items())]


@kvp_app.command("list")
def kvp_list(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show the host-to-guest and guest-to-host pools and the guest's intrinsic data."""
    with client(host) as api:
        data = api.get(url_path("vms", name, "kvp"))
    if output is Output.json:
        print_json(data)
        return
    columns = [("key", "Key"), ("value", "Value")]
    console.print(Text("Host to guest", style="bold"))
    table(_pairs(data["host"]), columns)
    if not data["guest_available"]:
        console.print(f"\nThe guest does not answer: {data['guest_error']}", highlight=False)
        return
    console.print(Text("\nGuest to host", style="bold"))
    table(_pairs(data["guest"]), columns)
    intrinsic = data.get("intrinsic") or {}
    console.print(Text("\nIntrinsic (from the guest)", style="bold"))
    table(_pairs(intrinsic.get("items", {})), columns)
    adapters = [{"name": a["name"], "mac": a["mac"],
                 "addresses": ", ".join([*a["ipv4"], *a["ipv6"]])}
                for a in intrinsic.get("adapters", [])]
    if adapters:
        console.print()
        table(adapters, [("name", "Adapter"), ("mac", "MAC"), ("addresses", "Addresses")])
    if data.get("ignored_guest_lines"):
        console.print(f"\n{data['ignored_guest_lines']} line(s) of the guest's pool file "
                      "were ignored (not key=value, or beyond the limits)")
