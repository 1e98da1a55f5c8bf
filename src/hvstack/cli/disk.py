"""``hv disk ...`` and ``hv image ...``: virtual disks and guest images."""

from __future__ import annotations

import os
from typing import Any

import typer

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    follow_job,
    print_json,
    size,
    table,
)
from hvstack.client import url_path

app = typer.Typer(help="Create, inspect and convert virtual disks.", no_args_is_help=True)
image_app = typer.Typer(help="Build and list guest images.", no_args_is_help=True)

DISK_FORMATS = {"virtual_size": size, "actual_size": size, "actual_size_before": size}


def _show(info: dict[str, Any], output: Output) -> None:
    print_json(info) if output is Output.json else details(info, DISK_FORMATS)


@app.command()
def create(path: str,
           size_: str | None = typer.Option(None, "--size", "-s", help="e.g. 20G"),
           type_: str = typer.Option("dynamic", "--type", "-t",
                                     help="fixed, dynamic or differencing"),
           parent: str | None = typer.Option(None, "--parent",
                                             help="parent of a differencing disk"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Create a virtual disk (New-VHD)."""
    body = {"path": os.path.abspath(path), "size": size_, "type": type_,
            "parent": os.path.abspath(parent) if parent else None}
    with client(host) as api:
        _show(api.post("/disks", {k: v for k, v in body.items() if v is not None}), output)


@app.command()
def inspect(path: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show a disk's format, kind, sizes and parent chain (Get-VHD)."""
    with client(host) as api:
        _show(api.get("/disks/inspect", params={"path": os.path.abspath(path)}), output)


@app.command()
def resize(path: str, size_: str = typer.Argument(..., metavar="SIZE"),
           allow_shrink: bool = typer.Option(False, "--allow-shrink",
                                             help="shrinking loses the data past the end"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Change a disk's virtual size (Resize-VHD)."""
    with client(host) as api:
        _show(api.post("/disks/resize", {"path": os.path.abspath(path), "size": size_,
                                         "allow_shrink": allow_shrink}), output)


def _job(path: str, body: dict[str, Any], what: str, output: Output, host: str | None) -> None:
    with client(host) as api:
        job = follow_job(api, api.post(path, body), what, quiet=output is Output.json)
    _show(job["result"], output)


@app.command()
def convert(source: str, destination: str,
            format_: str = typer.Option("qcow2", "--format", "-f",
                                        help="qcow2, raw, vhdx or vhd"),
            output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Convert a disk to another format, VHD/VHDX in and out (Convert-VHD)."""
    body = {"source": os.path.abspath(source), "destination": os.path.abspath(destination),
            "format": format_}
    _job("/disks/convert", body, "Converting", output, host)


@app.command()
def merge(path: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Merge a differencing disk into its parent (Merge-VHD)."""
    _job("/disks/merge", {"path": os.path.abspath(path)}, "Merging", output, host)


@app.command()
def compact(path: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Give a dynamic disk's unused space back (Optimize-VHD)."""
    _job("/disks/compact", {"path": os.path.abspath(path)}, "Compacting", output, host)


@image_app.command("list")
def list_images(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List the images VMs can be created from."""
    with client(host) as api:
        images = api.get("/images")
    if output is Output.json:
        print_json(images)
    elif not images:
        console.print("No images. Build one with: hv image build tiny")
    else:
        table(images, [("name", "Name"), ("format", "Format"), ("virtual_size", "Size"),
                       ("actual_size", "On disk"), ("path", "Path")], DISK_FORMATS)


@image_app.command()
def build(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Build an image from Debian packages ('tiny': kernel, busybox, guest agent)."""
    with client(host) as api:
        job = follow_job(api, api.post(url_path("images", name, "build")), f"Building {name}",
                         quiet=output is Output.json)
    if output is Output.json:
        print_json(job["result"])
    else:
        console.print(f"Image '{name}' is ready: {job['result']['path']}")
