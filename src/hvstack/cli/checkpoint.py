"""``hv checkpoint ...``: a VM's checkpoints (Hyper-V's Checkpoint-VM, Get-VMCheckpoint,
Restore-VMCheckpoint, Rename-VMCheckpoint, Remove-VMCheckpoint).

Checkpoint names are the user's text: printed as text, control characters escaped.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    escape_controls,
    fail,
    follow_job,
    local_time,
    print_json,
)
from hvstack.client import url_path

app = typer.Typer(help="Checkpoints of a VM: create, list, apply, rename, delete.",
                  no_args_is_help=True)

NOW = "Now"


def tree_lines(listing: dict[str, Any]) -> list[str]:
    """The checkpoint tree as indented lines, oldest first under each parent, with
    "Now" where the VM's current state is (under the checkpoint it follows)."""
    checkpoints = listing["checkpoints"]
    children: dict[str | None, list[dict[str, Any]]] = {}
    for checkpoint in checkpoints:
        children.setdefault(checkpoint["parent"], []).append(checkpoint)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for checkpoint in children.get(parent, []):
            kind = checkpoint["kind"] + (", automatic" if checkpoint["automatic"] else "")
            lines.append("  " * depth + f"{escape_controls(checkpoint['name'])}  ({kind}, "
                         f"{local_time(checkpoint['created_at'])})")
            walk(checkpoint["id"], depth + 1)
        if parent == listing["current"]:
            lines.append("  " * depth + NOW)

    walk(None, 0)
    return lines


@app.command("list")
def list_checkpoints(vm: str, output: Output = OutputOption,
                     host: str | None = HostOption) -> None:
    """Show a VM's checkpoint tree, with "Now" at its current state."""
    with client(host) as api:
        listing = api.list_checkpoints(vm)
    if output is Output.json:
        print_json(listing)
        return
    if not listing["checkpoints"]:
        console.print(f"VM '{listing['vm']}' has no checkpoints. Create one with: "
                      f"hv checkpoint create {listing['vm']}")
        return
    for line in tree_lines(listing):
        console.print(line, soft_wrap=True)


@app.command()
def create(vm: str, name: str | None = typer.Option(None, "--name", "-n",
                                                    help="default: 'VM - (date - time)'"),
           wait: bool = typer.Option(True, "--wait/--no-wait"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Checkpoint a VM (running, paused, saved or off); its checkpoint type decides
    whether memory is kept (hv vm set VM --checkpoint-type ...)."""
    with client(host) as api:
        job = api.post(url_path("vms", vm, "checkpoints"),
                       {"name": name} if name is not None else None)
        if wait:
            job = follow_job(api, job, f"Checkpointing {vm}")
    if output is Output.json:
        print_json(job)
    elif not wait:
        console.print(f"Checkpointing {vm}: job {job['id']} started")
    else:
        result = job.get("result") or {}
        console.print(f"Created {result.get('kind', '')} checkpoint "
                      f"'{escape_controls(str(result.get('name', '')))}' of VM '{vm}'"
                      + (f" ({result['note']})" if result.get("note") else ""), soft_wrap=True)


@app.command()
def apply(vm: str, checkpoint: str,
          yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
          save_current: bool = typer.Option(False, "--save-current",
                                            help="checkpoint the current state first"),
          wait: bool = typer.Option(True, "--wait/--no-wait"),
          output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Return a VM to a checkpoint: a production one leaves it Off, a standard one
    Saved. The current state is lost unless --save-current checkpoints it first."""
    if not yes and not save_current:
        if not sys.stdin.isatty():
            fail("applying a checkpoint loses the VM's current state: give --yes, or "
                 "--save-current to checkpoint it first")
        if not typer.confirm(f"Apply checkpoint '{escape_controls(checkpoint)}' to VM "
                             f"'{escape_controls(vm)}'? Its current state will be lost"):
            fail("nothing was changed")
    with client(host) as api:
        job = api.post(url_path("vms", vm, "checkpoints", checkpoint, "apply"),
                       {"save_current": save_current})
        if wait:
            job = follow_job(api, job, f"Applying checkpoint to {vm}")
    if output is Output.json:
        print_json(job)
    elif not wait:
        console.print(f"Applying a checkpoint to {vm}: job {job['id']} started")
    else:
        result = job.get("result") or {}
        console.print(f"Applied checkpoint '{escape_controls(str(result.get('name', '')))}'"
                      f": VM '{vm}' is {result.get('state', '')}", soft_wrap=True)


@app.command()
def rename(vm: str, checkpoint: str, new_name: str, output: Output = OutputOption,
           host: str | None = HostOption) -> None:
    """Rename a checkpoint."""
    with client(host) as api:
        renamed = api.rename_checkpoint(vm, checkpoint, new_name)
    if output is Output.json:
        print_json(renamed)
    else:
        console.print(f"Renamed checkpoint '{escape_controls(checkpoint)}' to "
                      f"'{escape_controls(renamed['name'])}'", soft_wrap=True)


# H2: hv checkpoint delete goes below this line.


@app.command()
def delete(vm: str, checkpoint: str,
           subtree: bool = typer.Option(False, "--subtree",
                                        help="also every checkpoint below it"),
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
           wait: bool = typer.Option(True, "--wait/--no-wait"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Delete a checkpoint (Remove-VMCheckpoint): its data is merged into the files
    that still need it, while the VM keeps running; no other checkpoint and not the
    current state change."""
    what = "and every checkpoint below it " if subtree else ""
    if not yes:
        if not sys.stdin.isatty():
            fail("deleting a checkpoint cannot be undone: give --yes")
        if not typer.confirm(f"Delete checkpoint '{escape_controls(checkpoint)}' {what}of VM "
                             f"'{escape_controls(vm)}'?"):
            fail("nothing was changed")
    with client(host) as api:
        job = api.delete_checkpoint(vm, checkpoint, subtree=subtree, wait=False)
        if wait:
            job = follow_job(api, job, f"Merging checkpoint files of {vm}")
    if output is Output.json:
        print_json(job)
    elif not wait:
        console.print(f"Deleting checkpoint '{escape_controls(checkpoint)}' of {vm}: job "
                      f"{job['id']} merges its files", soft_wrap=True)
    else:
        names = ", ".join(f"'{escape_controls(str(n))}'"
                          for n in (job.get("result") or {}).get("deleted", []))
        console.print(f"Deleted checkpoint {names} of VM '{escape_controls(vm)}'",
                      soft_wrap=True)
