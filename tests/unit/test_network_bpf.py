"""The eBPF encoder and the two VLAN trunk programs, byte for byte (x86-64 and other
little-endian hosts); :mod:`tests.integration.test_network_vlans` loads and runs them."""

from __future__ import annotations

import ctypes
import struct
import sys

import pytest

from hvstack.network import bpf

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="golden bytes are LE")


def listing(code: bytes) -> list[str]:
    return [code[i:i + 8].hex() for i in range(0, len(code), 8)]


def test_instructions_encode_as_struct_bpf_insn() -> None:
    assert bpf.insn(bpf.MOV64_X, 6, 1).hex() == "bf16000000000000"  # r6 = r1
    assert bpf.insn(bpf.LDX_MEM_W, 2, 6, 20).hex() == "6162140000000000"  # r2 = *(u32 *)(r6 + 20)
    assert bpf.insn(bpf.AND64_K, 7, imm=0xFFF).hex() == "57070000ff0f0000"
    assert bpf.insn(bpf.JEQ_K, 7, off=-6, imm=30).hex() == "1507faff1e000000"
    assert bpf.insn(bpf.JNE_K, 0, off=4).hex() == "5500040000000000"
    assert bpf.insn(bpf.JA, off=11).hex() == "05000b0000000000"
    assert bpf.insn(bpf.CALL, imm=bpf.REDIRECT).hex() == "8500000017000000"
    assert bpf.insn(bpf.MOV64_K, 0, imm=2).hex() == "b700000002000000"
    assert bpf.insn(bpf.EXIT).hex() == "9500000000000000"
    assert bpf.insn(bpf.MOV64_K, 1, imm=-1).hex() == "b7010000ffffffff"


TRUNK = [
    "bf16000000000000",  # 0  r6 = skb
    "6162140000000000",  # 1  r2 = skb->vlan_present
    "15020e0000000000",  # 2  if r2 == 0 goto pass (17)
    "61621c0000000000",  # 3  r2 = skb->vlan_proto
    "55020a0081000000",  # 4  if r2 != htons(0x8100) goto other (15)
    "6167180000000000",  # 5  r7 = skb->vlan_tci
    "57070000ff0f0000",  # 6  r7 &= 0xfff
    "15070b0000000000",  # 7  if r7 == 0 goto native (19)
    "15070a001e000000",  # 8  if r7 == 30 goto native
    "550702000a000000",  # 9  if r7 != 10 goto 12
    "b708000007000000",  # 10 r8 = ifindex 7
    "05000b0000000000",  # 11 goto redirect (23)
    "5507020014000000",  # 12 if r7 != 20 goto 15
    "b708000009000000",  # 13 r8 = ifindex 9
    "0500080000000000",  # 14 goto redirect
    "b700000002000000",  # 15 other: r0 = TC_ACT_SHOT
    "9500000000000000",  # 16 exit
    "b700000000000000",  # 17 pass: r0 = TC_ACT_OK
    "9500000000000000",  # 18 exit
    "bf61000000000000",  # 19 native: r1 = skb
    "8500000013000000",  # 20 call skb_vlan_pop
    "5500080000000000",  # 21 if r0 != 0 goto drop (30)
    "0500faff00000000",  # 22 goto pass
    "bf61000000000000",  # 23 redirect: r1 = skb
    "8500000013000000",  # 24 call skb_vlan_pop
    "5500040000000000",  # 25 if r0 != 0 goto drop
    "bf81000000000000",  # 26 r1 = r8
    "b702000000000000",  # 27 r2 = 0 (egress)
    "8500000017000000",  # 28 call redirect
    "9500000000000000",  # 29 exit (TC_ACT_REDIRECT or SHOT)
    "b700000002000000",  # 30 drop: r0 = TC_ACT_SHOT
    "9500000000000000",  # 31 exit
]


def test_trunk_ingress_program() -> None:
    assert listing(bpf.trunk_ingress(30, {20: 9, 10: 7})) == TRUNK
    # An uplink passes other tags (the host's own VLAN interfaces), code for code.
    uplink = listing(bpf.trunk_ingress(30, {20: 9, 10: 7}, others=bpf.TC_ACT_OK))
    assert uplink == [*TRUNK[:15], "b700000000000000", *TRUNK[16:]]
    # Nothing carried but the native VLAN: no redirect block (the verifier refuses
    # unreachable code).
    assert listing(bpf.trunk_ingress(1, {})) == [
        *TRUNK[:2], "1502080000000000", TRUNK[3], "5502040081000000", *TRUNK[5:7],
        "1507050000000000", "1507040001000000", *TRUNK[15:21], "5500010000000000",
        TRUNK[22], *TRUNK[30:]]


def test_tag_and_redirect_program() -> None:
    assert listing(bpf.tag_and_redirect(10, 5)) == [
        "bf16000000000000",  # r6 = skb
        "6162140000000000",  # r2 = skb->vlan_present
        "5502090000000000",  # if r2 != 0 goto drop (12): no double tags
        "bf61000000000000",  # r1 = skb
        "b702000081000000",  # r2 = htons(0x8100)
        "b70300000a000000",  # r3 = 10
        "8500000012000000",  # call skb_vlan_push
        "5500040000000000",  # if r0 != 0 goto drop
        "b701000005000000",  # r1 = ifindex 5
        "b702000000000000",  # r2 = 0 (egress)
        "8500000017000000",  # call redirect
        "9500000000000000",  # exit
        "b700000002000000",  # drop: r0 = TC_ACT_SHOT
        "9500000000000000",  # exit
    ]


def test_prog_load_attr_layout() -> None:
    code = bpf.tag_and_redirect(10, 5)
    bufs = [ctypes.create_string_buffer(n) for n in (4, 64, len(code))]
    attr = bpf.prog_load_attr(code, bufs[0], bufs[1], bufs[2], "hvstack_vlan")
    assert len(attr) == 128 and attr[64:] == bytes(64)
    fields = struct.unpack("=IIQQIIQII16s", attr[:64])
    assert fields[:2] == (bpf.BPF_PROG_TYPE_SCHED_CLS, 14)
    assert fields[2:4] == (ctypes.addressof(bufs[2]), ctypes.addressof(bufs[0]))
    assert fields[4:7] == (1, 64, ctypes.addressof(bufs[1]))
    assert fields[9] == b"hvstack_vlan".ljust(16, b"\0")
