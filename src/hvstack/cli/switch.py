"""``hv switch ...``: virtual switches (Hyper-V's New-VMSwitch, Get-VMSwitch, ...) and
the static port mappings of NAT switches (Add-NetNatStaticMapping)."""

from __future__ import annotations

from typing import Any

import typer

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    details,
    print_json,
    table,
)

app = typer.Typer(help="Create and manage virtual switches.", no_args_is_help=True)
nat_app = typer.Typer(help="Static port mappings of a NAT switch.", no_args_is_help=True)
app.add_typer(nat_app, name="nat")

LIST_COLUMNS = [("name", "Name"), ("type", "Type"), ("adapter", "Adapter"),
                ("subnet", "Subnet"), ("host_address", "Host address"), ("ports", "Ports"),
                ("notes", "Notes")]


def _mapping(m: dict[str, Any]) -> str:
    return f"{m['protocol']} {m['external_port']} -> {m['internal_ip']}:{m['internal_port']}"


def _show(switch: dict[str, Any], output: Output) -> None:
    if output is Output.json:
        print_json(switch)
        return
    view = dict(switch)
    view["mappings"] = [_mapping(m) for m in switch["mappings"]]
    view["ports"] = [f"{p['vm']}: {p['mac']}" + (f" (VLAN {p['vlan']})" if p["vlan"] else "")
                     for p in switch["ports"]]
    view["dhcp_range"] = (" - ".join(switch["dhcp_range"]) if switch["dhcp_range"]
                          else None)
    details(view)


@app.command("list")
def list_switches(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List the virtual switches of this host."""
    with client(host) as api:
        switches = api.list_switches()
        status = api.get("/network") if not switches and output is Output.table else None
    if output is Output.json:
        print_json(switches)
    elif not switches:
        if status is not None and not status["available"]:
            console.print(f"No switches: this host service cannot manage network devices "
                          f"({status['reason']}). VMs use user-mode NAT.")
        else:
            console.print("No switches. Create one with: hv switch create NAME --type nat")
    else:
        table([{**s, "ports": len(s["ports"])} for s in switches], LIST_COLUMNS)


@app.command()
def show(name: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Show a switch, its NAT mappings and the VM adapters on it."""
    with client(host) as api:
        _show(api.get_switch(name), output)


@app.command()
def create(
    name: str,
    type_: str = typer.Option(..., "--type", "-t",
                              help="external (bridges --adapter), internal (host and VMs), "
                                   "private (VMs only) or nat (internal + masquerading, "
                                   "DHCP and DNS)"),
    adapter: str | None = typer.Option(None, "--adapter",
                                       help="external: the host interface to bridge"),
    subnet: str | None = typer.Option(None, "--subnet",
                                      help="internal/nat: e.g. 192.168.100.0/24 (nat: "
                                           "default a free 172.16-31.x.0/24)"),
    host_address: str | None = typer.Option(None, "--host-address",
                                            help="the host's address on it; default: the "
                                                 "subnet's first"),
    notes: str = typer.Option("", "--notes"),
    output: Output = OutputOption, host: str | None = HostOption,
) -> None:
    """Create a virtual switch (New-VMSwitch)."""
    with client(host) as api:
        switch = api.create_switch(name, type_, adapter=adapter, subnet=subnet,
                                   host_address=host_address, notes=notes)
    if output is Output.json:
        print_json(switch)
    else:
        where = f", {switch['subnet']}" if switch["subnet"] else ""
        console.print(f"Created switch '{switch['name']}' ({switch['type']}{where})")


@app.command("set")
def set_(name: str,
         new_name: str | None = typer.Option(None, "--name", help="rename it"),
         notes: str | None = typer.Option(None, "--notes"),
         host_address: str | None = typer.Option(None, "--host-address"),
         output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Rename a switch, change its notes or the host's address on it."""
    if new_name is None and notes is None and host_address is None:
        from hvstack.cli.render import fail

        fail("nothing to change; see hv switch set --help")
    with client(host) as api:
        _show(api.update_switch(name, name=new_name, notes=notes, host_address=host_address),
              output)


@app.command()
def delete(name: str,
           force: bool = typer.Option(False, "--force",
                                      help="disconnect the VM adapters on it (they stay)"),
           output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Delete a switch (Remove-VMSwitch); one in use only with --force."""
    with client(host) as api:
        result = api.delete_switch(name, force)
    if output is Output.json:
        print_json(result)
        return
    console.print(f"Deleted switch '{result['deleted']}'")
    for port in result["disconnected"]:
        console.print(f"  disconnected {port['mac']} of VM '{port['vm']}'")


@nat_app.command("add-mapping")
def add_mapping(name: str,
                protocol: str = typer.Option("tcp", "--protocol", help="tcp or udp"),
                external_port: int = typer.Option(..., "--external-port"),
                internal_ip: str = typer.Option(..., "--internal-ip"),
                internal_port: int = typer.Option(..., "--internal-port"),
                output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Forward a host port to a VM's address (Add-NetNatStaticMapping)."""
    with client(host) as api:
        switch = api.add_nat_mapping(name, protocol, external_port, internal_ip, internal_port)
    print_json(switch) if output is Output.json else console.print(
        f"Switch '{switch['name']}': {protocol} {external_port} -> "
        f"{internal_ip}:{internal_port}")


@nat_app.command("remove-mapping")
def remove_mapping(name: str,
                   protocol: str = typer.Option("tcp", "--protocol", help="tcp or udp"),
                   external_port: int = typer.Option(..., "--external-port"),
                   output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Remove a static port mapping."""
    with client(host) as api:
        switch = api.remove_nat_mapping(name, protocol, external_port)
    print_json(switch) if output is Output.json else console.print(
        f"Switch '{switch['name']}': {protocol} {external_port} is no longer mapped")


@nat_app.command("list")
def list_mappings(name: str, output: Output = OutputOption,
                  host: str | None = HostOption) -> None:
    """List a NAT switch's static port mappings."""
    with client(host) as api:
        mappings = api.get_switch(name)["mappings"]
    if output is Output.json:
        print_json(mappings)
    elif not mappings:
        console.print("No mappings.")
    else:
        table(mappings, [("protocol", "Protocol"), ("external_port", "External port"),
                         ("internal_ip", "Internal IP"), ("internal_port", "Internal port")])
