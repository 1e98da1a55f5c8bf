"""The two tc eBPF programs of a trunk port, assembled here and loaded with bpf(2).

Why by hand: the kernels this runs on may lack bridge VLAN filtering, 802.1Q and tc's
``vlan`` action, but have ``cls_bpf`` (direct action) and the bpf(2) syscall. No
maintained pure-Python eBPF assembler exists (PyPI's ``bpf-asm`` is classic BPF; the
others need LLVM or BCC), and ``tc filter ... bpf`` wants an ELF object or a pinned
program; pyroute2 attaches a loaded program's descriptor (:mod:`.trunks`). The programs
need only a dozen opcodes, so :func:`insn` encodes ``struct bpf_insn`` and the program
builders below are golden-tested byte for byte.

* :func:`trunk_ingress` (on a trunk's ingress, frames the VM sends): untagged frames
  pass (to the port's bridge, its native VLAN); an 802.1Q tag of the native VLAN (or a
  priority tag, id 0) is popped and the frame passes; a tag of an allowed VLAN X is
  popped and the frame redirected to the egress of X's veth (it arrives in X's bridge
  untagged); any other tag (or 802.1ad) is dropped, or on an external adapter passed
  on untouched (it may be the host's own VLAN interface's).
* :func:`tag_and_redirect` (on the ingress of X's veth end outside the bridge, frames
  X's bridge sends towards the trunk): push tag X and redirect to the trunk's egress;
  a frame already tagged is dropped (no double tags reach a VM).

:func:`load` returns a program descriptor (close it once a tc filter holds it); a
verifier rejection raises HypervisorError carrying the verifier's log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from collections.abc import Mapping

from hvstack.errors import HypervisorError

# opcodes (linux/bpf.h, bpf_common.h)
LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
MOV64_K, MOV64_X, AND64_K = 0xB7, 0xBF, 0x57  # BPF_ALU64 | op | src
JEQ_K, JNE_K, JA = 0x15, 0x55, 0x05
CALL, EXIT = 0x85, 0x95
# helpers
SKB_VLAN_PUSH, SKB_VLAN_POP, REDIRECT = 18, 19, 23
# struct __sk_buff offsets
VLAN_PRESENT, VLAN_TCI, VLAN_PROTO = 20, 24, 28
TC_ACT_OK, TC_ACT_SHOT = 0, 2
ETH_P_8021Q = 0x8100
VID_MASK = 0x0FFF

BPF_PROG_LOAD, BPF_PROG_TYPE_SCHED_CLS = 5, 3
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
LOG_SIZE = 1 << 16


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn`` (registers packed as the host's bit-fields are)."""
    regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
    return struct.pack("=BBhi", code, regs, off, imm)


def _be16(value: int) -> int:
    """A ``__be16`` as the program sees it in a 32-bit register."""
    return int.from_bytes(value.to_bytes(2, "big"), sys.byteorder)


class _Program:
    """Instructions with forward jumps to named labels, resolved by :meth:`code`."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def add(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0,
            imm: int = 0) -> None:
        self.insns.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def code(self) -> bytes:
        out = b""
        for pc, (code, dst, src, off, imm) in enumerate(self.insns):
            jump = self.labels[off] - pc - 1 if isinstance(off, str) else off
            out += insn(code, dst, src, jump, imm)
        return out

    def verdict(self, name: str, action: int) -> None:
        self.label(name)
        self.add(MOV64_K, 0, imm=action)
        self.add(EXIT)


def trunk_ingress(native: int, allowed: Mapping[int, int], others: int = TC_ACT_SHOT
                  ) -> bytes:
    """The trunk's ingress program; ``allowed`` maps each VLAN id reached through a
    veth to that veth's ifindex (the native VLAN is the port's own bridge); frames
    with any other tag get ``others`` (an uplink passes them: they may be the host's)."""
    p = _Program()
    p.add(MOV64_X, 6, 1)  # r6 = skb
    p.add(LDX_MEM_W, 2, 6, VLAN_PRESENT)
    p.add(JEQ_K, 2, off="pass", imm=0)
    p.add(LDX_MEM_W, 2, 6, VLAN_PROTO)
    p.add(JNE_K, 2, off="other", imm=_be16(ETH_P_8021Q))
    p.add(LDX_MEM_W, 7, 6, VLAN_TCI)
    p.add(AND64_K, 7, imm=VID_MASK)  # r7 = vid
    p.add(JEQ_K, 7, off="native", imm=0)  # a priority tag: the native VLAN
    p.add(JEQ_K, 7, off="native", imm=native)
    for vid, ifindex in sorted(allowed.items()):
        p.add(JNE_K, 7, off=2, imm=vid)  # to the next id
        p.add(MOV64_K, 8, imm=ifindex)
        p.add(JA, off="redirect")
    p.verdict("other", others)
    p.verdict("pass", TC_ACT_OK)
    p.label("native")
    p.add(MOV64_X, 1, 6)
    p.add(CALL, imm=SKB_VLAN_POP)
    p.add(JNE_K, 0, off="drop", imm=0)
    p.add(JA, off="pass")
    if allowed:  # the verifier refuses unreachable code
        p.label("redirect")
        p.add(MOV64_X, 1, 6)
        p.add(CALL, imm=SKB_VLAN_POP)
        p.add(JNE_K, 0, off="drop", imm=0)
        p.add(MOV64_X, 1, 8)
        p.add(MOV64_K, 2, imm=0)  # flags 0: the device's egress
        p.add(CALL, imm=REDIRECT)
        p.add(EXIT)
    p.verdict("drop", TC_ACT_SHOT)
    return p.code()


def tag_and_redirect(vid: int, ifindex: int) -> bytes:
    """A VLAN's veth ingress program: tag ``vid`` and send out of ``ifindex``."""
    p = _Program()
    p.add(MOV64_X, 6, 1)
    p.add(LDX_MEM_W, 2, 6, VLAN_PRESENT)
    p.add(JNE_K, 2, off="drop", imm=0)
    p.add(MOV64_X, 1, 6)
    p.add(MOV64_K, 2, imm=_be16(ETH_P_8021Q))
    p.add(MOV64_K, 3, imm=vid)
    p.add(CALL, imm=SKB_VLAN_PUSH)
    p.add(JNE_K, 0, off="drop", imm=0)
    p.add(MOV64_K, 1, imm=ifindex)
    p.add(MOV64_K, 2, imm=0)
    p.add(CALL, imm=REDIRECT)
    p.add(EXIT)
    p.verdict("drop", TC_ACT_SHOT)
    return p.code()


def prog_load_attr(code: bytes, license_buf: ctypes.Array[ctypes.c_char],
                   log_buf: ctypes.Array[ctypes.c_char], insns_buf: ctypes.Array[ctypes.c_char],
                   name: str) -> bytes:
    """``union bpf_attr`` for BPF_PROG_LOAD (up to prog_name; the rest zero)."""
    return struct.pack(
        "=IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(code) // 8,
        ctypes.addressof(insns_buf), ctypes.addressof(license_buf), 1, len(log_buf),
        ctypes.addressof(log_buf), 0, 0, name.encode()[:15]).ljust(128, b"\0")


def load(code: bytes, name: str) -> int:
    """Load ``code`` as a sched_cls program; its descriptor (close-on-exec)."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise HypervisorError(f"eBPF programs are not supported on {platform.machine()}")
    insns_buf = ctypes.create_string_buffer(code, len(code))
    license_buf = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(LOG_SIZE)
    attr = ctypes.create_string_buffer(
        prog_load_attr(code, license_buf, log_buf, insns_buf, name), 128)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(libc.syscall(ctypes.c_long(number), ctypes.c_int(BPF_PROG_LOAD), attr,
                          ctypes.c_uint(128)))
    if fd < 0:
        code_ = ctypes.get_errno()
        log = log_buf.value.decode(errors="replace").strip()
        if code_ == errno.EPERM:  # (the verifier refuses a program with EACCES)
            raise HypervisorError("loading a VLAN trunk's eBPF program: not permitted "
                                  "(needs CAP_BPF or CAP_SYS_ADMIN)")
        raise HypervisorError(f"loading eBPF program {name}: {os.strerror(code_)}"
                              + (f"; verifier: {log}" if log else ""))
    return fd
