"""``hv vm move-storage NAME DEST [--disk PATH]...`` (Move-VMStorage): the VM's disks
and their checkpoint chains to another folder of the storage roots, with no downtime
for a running VM. Prints what moved and what stayed (and why) as text, never markup."""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.text import Text

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    escape_controls,
    follow_job,
    print_json,
)
from hvstack.cli.vm import app
from hvstack.client import url_path


def _show(result: dict[str, Any]) -> None:
    moved, skipped = result.get("moved", []), result.get("skipped", [])
    if not moved:
        console.print(Text("Nothing moved."))
    for item in moved:
        console.print(Text(f"moved   {escape_controls(item['from'])} -> "
                           f"{escape_controls(item['to'])}"), highlight=False)
    for item in skipped:
        console.print(Text(f"stayed  {escape_controls(item['path'])}: "
                           f"{escape_controls(item['reason'])}"), highlight=False)


@app.command("move-storage")
def move_storage(
    name: str,
    destination: str,
    disk: list[str] = typer.Option([], "--disk", help="move only this disk (its path; "
                                   "repeat for more); default: every disk"),
    include_checkpoints: bool = typer.Option(
        True, "--include-checkpoints/--no-include-checkpoints",
        help="move the disks' checkpoint files too (shared parents never move)"),
    bandwidth: str | None = typer.Option(None, "--bandwidth",
                                         help="at most this many bytes a second, e.g. 50M"),
    output: Output = OutputOption, host: str | None = HostOption,
) -> None:
    """Move a VM's storage to another folder while it runs (Move-VMStorage). The old
    files are deleted only after the VM switched to the new ones; cancelling the job
    (hv job cancel) leaves the VM on its old storage."""
    body: dict[str, Any] = {"destination": os.path.abspath(destination),
                            "disks": [os.path.abspath(d) for d in disk],
                            "include_checkpoints": include_checkpoints}
    if bandwidth is not None:
        body["bandwidth"] = bandwidth
    with client(host) as api:
        job = follow_job(api, api.post(url_path("vms", name, "move-storage"), body),
                         "Moving storage", quiet=output is Output.json)
    if output is Output.json:
        print_json(job["result"])
    else:
        _show(job["result"])
