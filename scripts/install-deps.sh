#!/usr/bin/env bash
# Installs the Debian packages hvstack and its tests need; does nothing when all are there.
set -euo pipefail
packages=(
  python3 python3-venv python3-pip
  qemu-system-x86 qemu-utils ovmf
  # the tiny guest image builder
  busybox-static qemu-guest-agent radvd mtools syslinux syslinux-common
  systemd-boot-efi e2fsprogs fdisk
  # tests and tools
  iproute2 socat procps
  # virtual switches: NAT rules and guards, DHCP/DNS of NAT switches
  nftables dnsmasq-base
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages: ${missing[*]}; run as root" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
