"""The host counters metering reads: /proc/<pid>/stat and a tap's statistics, from
files laid out as the kernel shows them."""

from __future__ import annotations

import os
from pathlib import Path

from hvstack.host.metering_probe import LinuxCounters, parse_stat
from hvstack.metering.model import Traffic

# A QEMU process's stat line; its command name holds a space and a ')'.
STAT = ("4242 (qemu-system-x86) x) S 1 4242 4242 0 -1 4194560 9000 0 3 0 "
        "1250 375 0 0 20 0 5 0 98765 2000000000 40000 18446744073709551615 1 1 0 0 0 0 0 "
        "4096 0 0 0 0 17 1 0 0 0 0 0\n")


def test_cpu_time_is_user_plus_system_and_the_start_names_the_process() -> None:
    times = parse_stat(STAT, 4242, 100, boot_time=1_000_000.0)
    assert times.cpu_seconds == (1250 + 375) / 100
    assert times.identity == "4242:98765"
    assert times.started_at == 1_000_000.0 + 987.65


def test_linux_counters_read_proc_and_sys(tmp_path: Path) -> None:
    proc, net = tmp_path / "proc", tmp_path / "net"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "stat").write_text(STAT)
    (proc / "uptime").write_text("5000.25 9000.00\n")
    statistics = net / "hvt12345abcdefg" / "statistics"
    statistics.mkdir(parents=True)
    (statistics / "tx_bytes").write_text("1000\n")  # the tap sent it to the VM
    (statistics / "rx_bytes").write_text("250\n")
    counters = LinuxCounters(proc, net)
    times = counters.process(4242)
    assert times is not None
    assert times.cpu_seconds == (1250 + 375) / os.sysconf("SC_CLK_TCK")
    assert counters.tap("hvt12345abcdefg") == Traffic(received=1000, sent=250)
    assert counters.process(4243) is None
    assert counters.tap("gone") is None


def test_this_process_is_read() -> None:
    times = LinuxCounters().process(os.getpid())
    assert times is not None and times.cpu_seconds > 0
