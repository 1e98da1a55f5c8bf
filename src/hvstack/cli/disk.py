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
    local_path,
    print_json,
    size,
    table,
)
from hvstack.client import url_path

app = typer.Typer(help="Create, inspect and convert virtual disks.", no_args_is_help=True)
image_app = typer.Typer(help="Build and list guest images.", no_args_is_help=True)

DISK_FORMATS = {"virtual_size": size, "actual_size": size, "actual_size_before": size}
FORMAT_HELP = "qcow2, raw, vhdx or vhd; default: as the extension says (.raw/.img is raw)"


def _format_option(help_: str = FORMAT_HELP) -> Any:
    return typer.Option(None, "--format", "-f", help=help_)


def _show(info: dict[str, Any], output: Output) -> None:
    print_json(info) if output is Output.json else details(info, DISK_FORMATS)


@app.command()
def create(path: str,
           size_: str | None = typer.Option(None, "--size", "-s", help="e.g. 20G"),
           type_: str | None = typer.Option(
               None, "--type", "-t", help="fixed, dynamic or differencing; default: "
               "differencing with --parent, fixed for raw, else dynamic"),
           parent: str | None = typer.Option(None, "--parent",
                                             help="parent of a differencing disk"),
           format_: str | None = _format_option(),
           parent_format: str | None = typer.Option(
               None, "--parent-format", help="the parent's format, if its name has no "
               "known extension"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Create a virtual disk (New-VHD). The extension sets the format: win.vhdx is a
    VHDX; a differencing disk is qcow2."""
    body = {"path": os.path.abspath(path), "size": size_, "type": type_,
            "parent": local_path(parent), "format": format_, "parent_format": parent_format}
    with client(host) as api:
        _show(api.post("/disks", {k: v for k, v in body.items() if v is not None}), output)


@app.command()
def inspect(path: str, format_: str | None = _format_option(), output: Output = OutputOption,
            host: str | None = HostOption) -> None:
    """Show a disk's format, kind, sizes and parent chain (Get-VHD)."""
    params = {"path": os.path.abspath(path), **({"format": format_} if format_ else {})}
    with client(host) as api:
        _show(api.get("/disks/inspect", params=params), output)


@app.command()
def resize(path: str, size_: str = typer.Argument(..., metavar="SIZE"),
           allow_shrink: bool = typer.Option(False, "--allow-shrink",
                                             help="shrinking loses the data past the end"),
           format_: str | None = _format_option(),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Change a disk's virtual size (Resize-VHD)."""
    body = {"path": os.path.abspath(path), "size": size_, "allow_shrink": allow_shrink,
            "format": format_}
    with client(host) as api:
        _show(api.post("/disks/resize", {k: v for k, v in body.items() if v is not None}),
              output)


def _job(path: str, body: dict[str, Any], what: str, output: Output, host: str | None) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    with client(host) as api:
        job = follow_job(api, api.post(path, body), what, quiet=output is Output.json)
    _show(job["result"], output)


@app.command()
def convert(source: str, destination: str,
            format_: str | None = _format_option(
                "the destination's format: qcow2, raw, vhdx or vhd; default: as its "
                "extension says"),
            source_format: str | None = typer.Option(
                None, "--source-format", help="the source's format, if its name has no "
                "known extension"),
            output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Convert a disk to another format, VHD/VHDX in and out (Convert-VHD). The
    destination's extension sets the format: a.vhd is a VHD."""
    body = {"source": os.path.abspath(source), "destination": os.path.abspath(destination),
            "format": format_, "source_format": source_format}
    _job("/disks/convert", body, "Converting", output, host)


@app.command()
def merge(path: str, format_: str | None = _format_option(), output: Output = OutputOption,
          host: str | None = HostOption) -> None:
    """Merge a differencing disk into its parent (Merge-VHD). Refused for a disk attached
    to a VM and for a parent something else uses (a managed image, another child)."""
    _job("/disks/merge", {"path": os.path.abspath(path), "format": format_}, "Merging",
         output, host)


@app.command()
def compact(path: str, format_: str | None = _format_option(), output: Output = OutputOption,
            host: str | None = HostOption) -> None:
    """Give a dynamic disk's unused space back (Optimize-VHD)."""
    _job("/disks/compact", {"path": os.path.abspath(path), "format": format_}, "Compacting",
         output, host)


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
