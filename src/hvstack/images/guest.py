"""The tiny guest's userspace files: busybox init's inittab and the scripts it runs.

Contract: :func:`guest_files` returns ``{absolute guest path: (mode, text)}`` for every
configuration file and script the initramfs needs besides binaries and modules. The
guest then behaves as follows (see ``RC_S``):

* busybox ``init`` is PID 1 (``/init``); its sysinit script mounts proc, sysfs,
  devtmpfs, devpts and a tmpfs on ``/run``, makes ``/var/lib/hvstack/kvp`` (the KVP
  exchange folder, see docs/integration-services.md), loads the modules listed in
  ``/lib/modules/hvstack.load`` in order, sets the hostname ``tiny``, brings ``lo``
  up, starts the network watcher in the background (below), mounts the ext4
  partition labelled ``hvdata`` on ``/data`` (waiting up to 10 s for the disk),
  links ``/dev/virtio-ports/<name>`` and starts ``qemu-ga`` on
  ``org.qemu.guest_agent.0`` if that port exists (state in ``/run/qemu-ga``),
  starts ``acpid`` so the ACPI power button powers off cleanly, and finally prints
  :data:`READY_LINE` on the console.
* Network: ``/sbin/hvstack-netwatch`` polls once a second and starts ``udhcpc``
  (sending the hostname) on every adapter, also adapters hot-added later; a removed
  adapter's udhcpc is stopped. ``hvstack-static IFACE ADDR/PREFIX [GATEWAY]`` turns
  DHCP off on an adapter and sets a static address, ``hvstack-dhcp IFACE`` (re)starts
  DHCP (with the current hostname), ``hvstack-ifname MAC`` names the adapter with a
  MAC. State lives in :data:`NET_STATE`. The kernel has e1000, virtio-net and 8021q
  (``ip link add link eth0 name eth0.10 type vlan id 10``). For tests that play a
  rogue server, busybox ``udhcpd`` (config at a path the test writes, leases in
  ``/var/lib/misc``) and ``/usr/sbin/radvd`` (``radvd -C FILE``) are there.
* Then init respawns a root shell (prompt ``tiny# ``) on the serial console.
* ``/sbin/hvstack-poweroff MODE`` (MODE: poweroff, reboot, halt, or ``none`` to only
  sync and unmount) syncs, unmounts ``/data`` (or remounts it read-only when busy)
  and then runs ``MODE -f``. The power button and ``/sbin/shutdown`` (which
  qemu-ga's guest-shutdown runs as ``shutdown -h -P|-H|-r +0 MSG``) both use it.
"""

from __future__ import annotations

READY_LINE = "hvstack-tiny: ready"
"""Printed on the serial console once the guest is fully up."""

HOSTNAME = "tiny"
DATA_LABEL = "hvdata"
AGENT_PORT = "org.qemu.guest_agent.0"
MODULE_LIST = "/lib/modules/hvstack.load"
PROMPT = "tiny# "
NET_STATE = "/run/hvstack-net"
"""Per-adapter DHCP state: ``NAME`` holds ``IFINDEX dhcp|static``, ``NAME.pid`` the
udhcpc serving it, ``NAME.log`` its output."""

INITTAB = """\
# busybox init: bring-up once, then a respawning root shell on the serial console
::sysinit:/etc/init.d/rcS
::respawn:/sbin/hvstack-console
::ctrlaltdel:/sbin/hvstack-poweroff reboot
::shutdown:/sbin/hvstack-poweroff none
"""

RC_S = f"""\
#!/bin/sh
# hvstack tiny guest bring-up, run once by busybox init (sysinit).
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
say() {{ echo "hvstack-tiny: $*"; }}

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mkdir -p /run/qemu-ga /tmp /data /var/lib/hvstack/kvp
hostname {HOSTNAME}

# Kernel modules, dependencies first (the list was resolved at build time).
while read -r module; do
    [ -n "$module" ] || continue
    insmod "$module" 2>/dev/null || say "could not load $module"
done < {MODULE_LIST}

# Network: loopback now; every adapter (also those hot-added later) gets DHCP from
# the watcher, in the background (never blocks boot).
ip link set lo up
mkdir -p {NET_STATE} /var/lib/misc
setsid /sbin/hvstack-netwatch </dev/null >/dev/null 2>&1 &

# Data partition: ext4 labelled {DATA_LABEL}, mounted read-write on /data.
dev=""
tries=0
while [ "$tries" -lt 100 ]; do
    dev=$(findfs LABEL={DATA_LABEL} 2>/dev/null) && [ -n "$dev" ] && break
    dev=""
    sleep 0.1
    tries=$((tries + 1))
done
if [ -n "$dev" ] && mount -t ext4 -o rw,noatime "$dev" /data; then
    say "mounted $dev on /data"
else
    say "no {DATA_LABEL} partition found; /data is in RAM"
fi

# virtio-serial ports by name, as udev would link them.
link_ports() {{
    for port in /sys/class/virtio-ports/vport*; do
        [ -r "$port/name" ] || continue
        name=$(cat "$port/name")
        [ -n "$name" ] && ln -sfn "../${{port##*/}}" "/dev/virtio-ports/$name"
    done
}}
if ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep -q '^virtio'; then
    tries=0
    while [ "$tries" -lt 50 ]; do
        link_ports
        [ -e /dev/virtio-ports/{AGENT_PORT} ] && break
        sleep 0.1
        tries=$((tries + 1))
    done
fi

# Guest agent (integration services).
if [ -e /dev/virtio-ports/{AGENT_PORT} ]; then
    qemu-ga -d -m virtio-serial -p /dev/virtio-ports/{AGENT_PORT} \\
        -t /run/qemu-ga -f /run/qemu-ga.pid -l /run/qemu-ga.log
    tries=0
    while [ "$tries" -lt 50 ] && [ ! -s /run/qemu-ga.pid ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    if [ -s /run/qemu-ga.pid ] && kill -0 "$(cat /run/qemu-ga.pid)" 2>/dev/null; then
        # The integration services outlive a program that runs the guest out of memory
        # (a demand step faster than dynamic memory's round): never the OOM killer's pick.
        echo -1000 > "/proc/$(cat /run/qemu-ga.pid)/oom_score_adj"
        say "guest agent running (pid $(cat /run/qemu-ga.pid))"
    else
        say "guest agent failed to start:"
        cat /run/qemu-ga.log 2>/dev/null
    fi
fi

# ACPI power button -> clean power off.
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid || say "acpid failed to start"

echo "{READY_LINE}"
"""

POWEROFF = """\
#!/bin/sh
# hvstack-poweroff MODE: sync, unmount /data, then MODE -f (poweroff|reboot|halt|none).
mode=${1:-poweroff}
case "$mode" in
    poweroff|reboot|halt|none) ;;
    *) mode=poweroff ;;
esac
[ "$mode" = none ] || echo "hvstack-tiny: $mode" >/dev/console 2>/dev/null
sync
if grep -q ' /data ' /proc/mounts 2>/dev/null; then
    umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
fi
sync
[ "$mode" = none ] && exit 0
exec "$mode" -f
"""

SHUTDOWN = """\
#!/bin/sh
# /sbin/shutdown as qemu-ga runs it: shutdown -h -P|-H|-r +0 "message".
# -r reboots, -H halts, anything else powers off; the time and message are ignored.
mode=poweroff
for arg in "$@"; do
    case "$arg" in
        -r) mode=reboot ;;
        -H) mode=halt ;;
        -P) mode=poweroff ;;
    esac
done
# Let the caller see a clean exit before the machine goes away.
( sleep 0.2; exec /sbin/hvstack-poweroff "$mode" ) </dev/null >/dev/null 2>&1 &
exit 0
"""

CONSOLE = """\
#!/bin/sh
# A root shell on the console (the serial port: it is the last console= argument).
# init respawns this script; the pause keeps a missing serial port from spinning.
cd /root
setsid cttyhack sh -l
sleep 1
"""

POWER_BUTTON = """\
#!/bin/sh
# busybox acpid: ACPI power button pressed (QMP system_powerdown)
exec /sbin/hvstack-poweroff poweroff
"""

UDHCPC_SCRIPT = """\
#!/bin/sh
# udhcpc event handler: apply the lease to $interface.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip -4 addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip -4 route del default dev "$interface" 2>/dev/null
            for gw in $router; do
                ip -4 route add default via "$gw" dev "$interface"
                break
            done
        fi
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >>/etc/resolv.conf
        done
        ;;
esac
exit 0
"""

NET_COMMON = f"""\
# shared by the hvstack-net* scripts: the state folder and stopping an adapter's udhcpc
state={NET_STATE}
mkdir -p "$state"
stop_dhcp() {{
    pid=$(cat "$state/$1.pid" 2>/dev/null)
    rm -f "$state/$1.pid"
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    # wait for its release (and deconfig) so nothing it does comes after the caller's
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    kill -9 "$pid" 2>/dev/null
    return 0
}}
"""

NETWATCH = """\
#!/bin/sh
# hvstack-netwatch: every network adapter gets DHCP (busybox udhcpc), also adapters
# hot-added later: polls once a second. An adapter is an interface with a device
# behind it (not lo, a VLAN or a bridge made in the guest). A removed adapter's udhcpc
# is stopped; a new adapter that reuses a name (another ifindex) starts afresh.
. /etc/hvstack-net.sh
while true; do
    for dev in /sys/class/net/*; do
        [ -e "$dev/device" ] || continue
        name=${dev##*/}
        index=$(cat "$dev/ifindex" 2>/dev/null) || continue
        [ "$(cut -d' ' -f1 "$state/$name" 2>/dev/null)" = "$index" ] && continue
        /sbin/hvstack-dhcp "$name"
    done
    for mark in "$state"/*; do
        case "$mark" in *.pid|*.log|"$state/*") continue ;; esac
        name=${mark##*/}
        known=$(cut -d' ' -f1 "$mark" 2>/dev/null)
        [ "$(cat "/sys/class/net/$name/ifindex" 2>/dev/null)" = "$known" ] && continue
        stop_dhcp "$name"
        rm -f "$mark"
    done
    sleep 1
done
"""

DHCP = """\
#!/bin/sh
# hvstack-dhcp IFACE: (re)start DHCP on IFACE now, sending the current hostname (so
# "hostname web1; hvstack-dhcp eth0" registers web1 with the switch's DNS).
. /etc/hvstack-net.sh
name=$1
index=$(cat "/sys/class/net/$name/ifindex" 2>/dev/null) || {
    echo "hvstack-dhcp: no interface $name" >&2
    exit 1
}
stop_dhcp "$name"
echo "$index dhcp" >"$state/$name"
ip link set "$name" up
udhcpc -f -i "$name" -s /etc/udhcpc.script -x "hostname:$(hostname)" -R -T 2 -A 5 \\
    </dev/null >>"$state/$name.log" 2>&1 &
echo $! >"$state/$name.pid"
"""

STATIC = """\
#!/bin/sh
# hvstack-static IFACE ADDRESS/PREFIX [GATEWAY]: stop DHCP on IFACE (the watcher
# leaves it alone from now on) and give it this address instead.
. /etc/hvstack-net.sh
name=$1
address=$2
gateway=$3
index=$(cat "/sys/class/net/$name/ifindex" 2>/dev/null) || {
    echo "hvstack-static: no interface $name" >&2
    exit 1
}
[ -n "$address" ] || {
    echo "usage: hvstack-static IFACE ADDRESS/PREFIX [GATEWAY]" >&2
    exit 2
}
echo "$index static" >"$state/$name"
stop_dhcp "$name"
ip -4 addr flush dev "$name"
ip link set "$name" up
ip -4 addr add "$address" dev "$name" || exit 1
if [ -n "$gateway" ]; then
    ip -4 route replace default via "$gateway" dev "$name" || exit 1
fi
"""

IFNAME = """\
#!/bin/sh
# hvstack-ifname MAC: print the name of the network adapter with this MAC.
want=$(echo "$1" | tr 'A-F-' 'a-f:')
for dev in /sys/class/net/*; do
    [ -e "$dev/device" ] || continue
    if [ "$(cat "$dev/address" 2>/dev/null)" = "$want" ]; then
        echo "${dev##*/}"
        exit 0
    fi
done
echo "hvstack-ifname: no adapter has MAC $1" >&2
exit 1
"""

OS_RELEASE = """\
NAME="hvstack tiny"
ID=hvstack-tiny
PRETTY_NAME="hvstack tiny guest (busybox)"
VERSION_ID=1
"""

PROFILE = f"""\
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root
export TERM=${{TERM:-vt100}}
export PS1='{PROMPT}'
"""


def guest_files() -> dict[str, tuple[int, str]]:
    """Return ``{guest path: (mode, text)}`` for the tiny guest's config and scripts."""
    return {
        "/etc/inittab": (0o644, INITTAB),
        "/etc/init.d/rcS": (0o755, RC_S),
        "/etc/profile": (0o644, PROFILE),
        "/etc/hostname": (0o644, f"{HOSTNAME}\n"),
        "/etc/os-release": (0o644, OS_RELEASE),
        "/etc/hosts": (0o644, f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"),
        "/etc/passwd": (0o644, "root:x:0:0:root:/root:/bin/sh\n"),
        "/etc/shadow": (0o600, "root:*:19000:0:99999:7:::\n"),
        "/etc/group": (0o644, "root:x:0:\ntty:x:5:\n"),
        "/etc/resolv.conf": (0o644, ""),
        "/etc/udhcpc.script": (0o755, UDHCPC_SCRIPT),
        "/etc/hvstack-net.sh": (0o644, NET_COMMON),
        "/sbin/hvstack-netwatch": (0o755, NETWATCH),
        "/sbin/hvstack-dhcp": (0o755, DHCP),
        "/sbin/hvstack-static": (0o755, STATIC),
        "/sbin/hvstack-ifname": (0o755, IFNAME),
        "/etc/acpi/PWRF/00000080": (0o755, POWER_BUTTON),
        "/sbin/hvstack-poweroff": (0o755, POWEROFF),
        "/sbin/hvstack-console": (0o755, CONSOLE),
        "/sbin/shutdown": (0o755, SHUTDOWN),
    }
