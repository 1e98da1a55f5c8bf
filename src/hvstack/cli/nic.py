"""``hv vm nic ...``: a VM's network adapters (Add-VMNetworkAdapter,
Connect-VMNetworkAdapter, Set-VMNetworkAdapter, Set-VMNetworkAdapterVlan, ...).

Rates, VLAN lists and ACLs are checked here before anything is sent (bad input: one
line, exit code 2); the service checks them again.
"""

from __future__ import annotations

from typing import Any

import typer

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    fail,
    print_json,
    table,
)
from hvstack.errors import HvError
from hvstack.network.model import check_vlan_id, parse_acl_remote, parse_rate, parse_vlan_list

app = typer.Typer(help="A VM's network adapters: add, connect, set, remove.",
                  no_args_is_help=True)

ACL_HELP = ("ACTION:DIRECTION:REMOTE, e.g. deny:outbound:10.0.0.0/8 or "
            "allow:both:52:54:00:12:34:56 (repeatable; replaces the port's ACLs). "
            "The most specific matching ACL decides (longest prefix; a MAC beats any "
            "prefix; deny wins a tie); unmatched traffic passes: --acl deny:both:0.0.0.0/0 "
            "--acl allow:both:10.1.0.0/16 allows only 10.1/16 over IPv4")


def adapter_line(nic: dict[str, Any]) -> str:
    """One adapter as ``hv vm show`` prints it: MAC, model, switch, VLAN, addresses."""
    if nic["mode"] == "user":
        where = "user-mode NAT"
    elif nic.get("switch"):
        where = f"switch '{nic.get('switch_name') or nic['switch']}'"
    else:
        where = "not connected"
    vlan = vlan_text(nic)
    line = f"{nic['mac']} ({nic['model']}, {where}" + (f", VLAN {vlan})" if vlan else ")")
    if nic.get("ip_addresses"):
        line += " " + ", ".join(nic["ip_addresses"])
    return line


def vlan_text(nic: dict[str, Any]) -> str:
    """``10`` (access), ``trunk 10,20 native 10``, or "" (untagged)."""
    vlan = (nic.get("port") or {}).get("vlan") or {}
    if vlan.get("mode") == "access":
        return str(vlan["access_id"])
    if vlan.get("mode") == "trunk":
        native = f" native {vlan['native']}" if vlan.get("native") is not None else ""
        return f"trunk {','.join(map(str, vlan['allowed']))}{native}"
    return ""


def _rate(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if text.strip().lower() in ("0", "none"):
        return 0
    return parse_rate(text, what=what)


def _acl(text: str) -> dict[str, str]:
    action, _, rest = text.partition(":")
    direction, _, remote = rest.partition(":")
    if action not in ("allow", "deny") or direction not in ("inbound", "outbound", "both") \
            or not remote:
        fail(f"--acl '{text}' is not {ACL_HELP.split(',')[0]}")
    return {"action": action, "direction": direction, "remote": parse_acl_remote(remote)}


def _vlan(vlan: str | None, trunk: str | None, native: int | None) -> dict[str, Any] | None:
    if vlan is not None and trunk is not None:
        fail("--vlan (access mode) and --trunk exclude each other")
    if native is not None and trunk is None:
        fail("--native-vlan goes with --trunk")
    if trunk is not None:
        return {"mode": "trunk", "allowed": list(parse_vlan_list(trunk)),
                "native": check_vlan_id(native) if native is not None else None}
    if vlan is None:
        return None
    if vlan.strip().lower() in ("none", "untagged"):
        return {"mode": "untagged"}
    if not vlan.strip().isdigit():
        fail(f"--vlan '{vlan}' is not a VLAN id (1-4094) or none")
    return {"mode": "access", "access_id": check_vlan_id(int(vlan))}


def _body(*args: Any) -> dict[str, Any]:
    """The request of ``nic add`` and ``nic set``; bad input is one line, exit code 2."""
    try:
        return _checked_body(*args)
    except HvError as exc:
        fail(exc.message)


def _checked_body(switch: str | None, user_mode: bool, mac: str | None, model: str | None,
                  vlan: str | None, trunk: str | None, native: int | None,
                  bandwidth_max: str | None, bandwidth_min: str | None,
                  mac_spoofing: bool | None, dhcp_guard: bool | None,
                  router_guard: bool | None, acl: list[str], no_acls: bool,
                  mirror: str | None) -> dict[str, Any]:
    if user_mode and switch is not None:
        fail("--user-mode and --switch exclude each other")
    if acl and no_acls:
        fail("--acl and --no-acls exclude each other")
    if mirror is not None and mirror not in ("none", "source", "destination"):
        fail(f"--mirror '{mirror}' is not none, source or destination")
    body: dict[str, Any] = {
        "switch": switch, "mode": "user" if user_mode else None, "mac": mac, "model": model,
        "vlan": _vlan(vlan, trunk, native),
        "bandwidth_max": _rate(bandwidth_max, "maximum bandwidth"),
        "bandwidth_min": _rate(bandwidth_min, "minimum bandwidth"),
        "mac_spoofing": mac_spoofing, "dhcp_guard": dhcp_guard, "router_guard": router_guard,
        "acls": [] if no_acls else ([_acl(a) for a in acl] if acl else None),
        "mirror": mirror,
    }
    return {k: v for k, v in body.items() if v is not None}


SwitchOption = typer.Option(None, "--switch", "-s", help="the switch to connect to")
MacOption = typer.Option(None, "--mac", help="an address, or dynamic (from the pool)")
ModelOption = typer.Option(None, "--model", help="virtio or e1000")
VlanOption = typer.Option(None, "--vlan", help="access mode VLAN id (1-4094), or none")
TrunkOption = typer.Option(None, "--trunk", help="trunk mode: allowed VLANs, e.g. 10,20-30")
NativeOption = typer.Option(None, "--native-vlan", help="trunk: the untagged VLAN")
MaxOption = typer.Option(None, "--bandwidth-max", help="e.g. 100M (bits/s); 0 removes it")
MinOption = typer.Option(None, "--bandwidth-min",
                         help="share under contention, e.g. 10M; 0 removes it")
SpoofOption = typer.Option(None, "--mac-spoofing/--no-mac-spoofing",
                           help="let the VM send from other MACs (off by default)")
DhcpOption = typer.Option(None, "--dhcp-guard/--no-dhcp-guard",
                          help="drop DHCP server messages from the VM")
RouterOption = typer.Option(None, "--router-guard/--no-router-guard",
                            help="drop router advertisements and redirects from the VM")
AclOption = typer.Option([], "--acl", help=ACL_HELP)
NoAclsOption = typer.Option(False, "--no-acls", help="remove every ACL of the port")
MirrorOption = typer.Option(None, "--mirror", help="none, source or destination")


def _print_vm(vm: dict[str, Any], output: Output, message: str) -> None:
    if output is Output.json:
        print_json(vm)
        return
    console.print(message)
    for nic in vm["network_adapters"]:
        console.print("  " + adapter_line(nic))


@app.command("list")
def list_nics(vm: str, output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List a VM's adapters: switch, MAC, VLAN and the guest's addresses."""
    with client(host) as api:
        nics = api.list_adapters(vm)
    if output is Output.json:
        print_json(nics)
    elif not nics:
        console.print(f"VM '{vm}' has no network adapters.")
    else:
        rows = [{**n, "switch": (n.get("switch_name") or ("user-mode NAT" if n["mode"] == "user"
                                                          else "not connected")),
                 "vlan": vlan_text(n) or "-",
                 "acls": [f"#{c['index']} {c['packets']} packets" for c in n["acl_counters"]]}
                for n in nics]
        table(rows, [("mac", "MAC"), ("model", "Model"), ("switch", "Switch"),
                     ("vlan", "VLAN"), ("ip_addresses", "IP addresses"),
                     ("acls", "ACL matches")])


@app.command()
def add(vm: str, switch: str | None = SwitchOption,
        user_mode: bool = typer.Option(False, "--user-mode",
                                       help="QEMU's user-mode NAT (no switch, no privilege)"),
        mac: str | None = MacOption, model: str | None = ModelOption,
        vlan: str | None = VlanOption, trunk: str | None = TrunkOption,
        native_vlan: int | None = NativeOption, bandwidth_max: str | None = MaxOption,
        bandwidth_min: str | None = MinOption, mac_spoofing: bool | None = SpoofOption,
        dhcp_guard: bool | None = DhcpOption, router_guard: bool | None = RouterOption,
        acl: list[str] = AclOption, no_acls: bool = NoAclsOption,
        mirror: str | None = MirrorOption,
        output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Add an adapter (hot added to a running VM). Without --switch: the Default Switch
    if the host has one, else user-mode NAT."""
    body = _body(switch, user_mode, mac, model, vlan, trunk, native_vlan, bandwidth_max,
                 bandwidth_min, mac_spoofing, dhcp_guard, router_guard, acl, no_acls, mirror)
    with client(host) as api:
        result = api.add_adapter(vm, **body)
    _print_vm(result, output, f"Added {result['network_adapters'][-1]['mac']} to VM "
                              f"'{result['name']}'")


@app.command("set")
def set_(vm: str, mac: str, switch: str | None = SwitchOption,
         disconnect: bool = typer.Option(False, "--disconnect",
                                         help="take it off its switch (it stays)"),
         new_mac: str | None = MacOption, model: str | None = ModelOption,
         vlan: str | None = VlanOption, trunk: str | None = TrunkOption,
         native_vlan: int | None = NativeOption, bandwidth_max: str | None = MaxOption,
         bandwidth_min: str | None = MinOption, mac_spoofing: bool | None = SpoofOption,
         dhcp_guard: bool | None = DhcpOption, router_guard: bool | None = RouterOption,
         acl: list[str] = AclOption, no_acls: bool = NoAclsOption,
         mirror: str | None = MirrorOption,
         output: Output = OutputOption, host: str | None = HostOption) -> None:
    """Connect an adapter to a switch, disconnect it, or change its port settings
    (while the VM runs, too; the MAC and model only while it is off)."""
    if disconnect and switch is not None:
        fail("--disconnect and --switch exclude each other")
    body = _body("" if disconnect else switch, False, new_mac, model, vlan, trunk,
                 native_vlan, bandwidth_max, bandwidth_min, mac_spoofing, dhcp_guard,
                 router_guard, acl, no_acls, mirror)
    if not body:
        fail("nothing to change; see hv vm nic set --help")
    with client(host) as api:
        result = api.update_adapter(vm, mac, **body)
    _print_vm(result, output, f"Changed adapter {mac} of VM '{result['name']}'")


@app.command()
def remove(vm: str, mac: str, output: Output = OutputOption,
           host: str | None = HostOption) -> None:
    """Remove an adapter (hot removed from a running VM)."""
    with client(host) as api:
        result = api.remove_adapter(vm, mac)
    _print_vm(result, output, f"Removed adapter {mac} from VM '{result['name']}'")
