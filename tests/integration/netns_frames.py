"""Raw Ethernet frames for network tests, sent and received with AF_PACKET sockets.

Run as a script inside a network namespace (``ip netns exec NS python netns_frames.py``):

* ``send IFACE HEXFRAME...``: sends each frame as given.
* ``recv IFACE MARKS SECONDS``: prints ``ready``, then collects the tags (see
  :func:`tag_of`) of frames it receives until it has seen every tag of the
  comma-separated ``MARKS`` or the time is up, then prints them as one JSON list.

Each frame built here carries a tag (``TAG:<name>;``) in its payload, so a receiver
can say which frames came through without parsing protocols.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
_TAG = re.compile(rb"TAG:([A-Za-z0-9_-]+);")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def udp_frame(dst_mac: str, src_mac: str, src: str, dst: str, sport: int, dport: int,
              tag: str) -> bytes:
    body = f"TAG:{tag};".encode()
    udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    return ether(dst_mac, src_mac, 0x0800, ipv4(src, dst, 17, udp))


def icmp_frame(dst_mac: str, src_mac: str, src: str, dst: str, icmp_type: int,
               tag: str) -> bytes:
    body = struct.pack("!BBHI", icmp_type, 0, 0, 0) + f"TAG:{tag};".encode()
    body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    return ether(dst_mac, src_mac, 0x0800, ipv4(src, dst, 1, body))


def router_advert_frame(src_mac: str, tag: str) -> bytes:
    """An ICMPv6 router advertisement to all nodes (checksum left zero: the bridge
    does not check it, and the receiver here reads raw frames)."""
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + f"TAG:{tag};".encode()
    src = bytes.fromhex("fe80000000000000") + mac_bytes(src_mac)[:3] + b"\xff\xfe" \
        + mac_bytes(src_mac)[3:]
    dst = bytes.fromhex("ff020000000000000000000000000001")
    ip6 = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + src + dst
    return ether("33:33:00:00:00:01", src_mac, 0x86DD, ip6 + body)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return (struct.pack("!IHBB", 0x60000000, len(payload), next_header, hop_limit)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


def udp6_frame(dst_mac: str, src_mac: str, src: str, dst: str, sport: int, dport: int,
               tag: str) -> bytes:
    """A UDP datagram over IPv6 (checksum left zero, as in the other IPv6 frames)."""
    body = f"TAG:{tag};".encode()
    udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    return ether(dst_mac, src_mac, 0x86DD, ipv6(src, dst, 17, udp))


def neighbor_solicit_frame(src_mac: str, src: str, target: str, tag: str) -> bytes:
    """An ICMPv6 neighbour solicitation for ``target``, to its solicited-node group."""
    low = socket.inet_pton(socket.AF_INET6, target)[-3:]
    group = socket.inet_ntop(socket.AF_INET6, bytes.fromhex("ff0200000000000000000001ff")
                             + low)
    body = (struct.pack("!BBHI", 135, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, target)
            + f"TAG:{tag};".encode())
    return ether("33:33:ff:" + low.hex(":"), src_mac, 0x86DD, ipv6(src, group, 58, body, 255))


def arp_frame(src_mac: str, sender_mac: str, sender_ip: str, target_ip: str,
              tag: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac_bytes(sender_mac),
                      socket.inet_aton(sender_ip), b"\0" * 6, socket.inet_aton(target_ip))
    return ether("ff:ff:ff:ff:ff:ff", src_mac, 0x0806, arp + f"TAG:{tag};".encode())


def tag_of(frame: bytes) -> str | None:
    match = _TAG.search(frame)
    return match[1].decode() if match else None


def _send(iface: str, frames: list[str]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for frame in frames:
            sock.send(bytes.fromhex(frame))


def _recv(iface: str, marks: set[str], seconds: float) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((iface, 0))
        print("ready", flush=True)
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while not marks <= set(seen) and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                frame, address = sock.recvfrom(65535)
            except TimeoutError:
                break
            tag = tag_of(frame)
            if tag is not None and address[2] != socket.PACKET_OUTGOING:
                seen.append(tag)
        print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        _send(sys.argv[2], sys.argv[3:])
    else:
        _recv(sys.argv[2], set(sys.argv[3].split(",")), float(sys.argv[4]))
