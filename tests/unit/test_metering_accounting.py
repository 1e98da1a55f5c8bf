"""Metering's accounting with worked examples: deltas, counters that restart, a new
QEMU process, the base taken when metering begins, averages, minimum and maximum."""

from __future__ import annotations

from hvstack.metering.accounting import add, begin, report
from hvstack.metering.model import DiskIo, Sample, Totals, Traffic

MIB = 1024 * 1024
MAC, USER_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02"


def sample(at: float, cpu: float, *, process: str = "100:5", started: float = 0.0,
           memory: int = 512 * MIB, read: int = 0, written: int = 0,
           traffic: Traffic | None = None, user: bool = False) -> Sample:
    adapters: dict[str, Traffic | None] = {MAC: traffic or Traffic()}
    if user:
        adapters[USER_MAC] = None
    return Sample(at, process, started, cpu, memory, {"disk-a-dev": DiskIo(read, written)},
                  adapters)


def test_growth_between_samples_of_one_process_is_counted() -> None:
    totals = begin(100.0, sample(100.0, 50.0, read=1000, written=2000,
                                 traffic=Traffic(10, 20)))
    totals = add(totals, sample(110.0, 55.0, read=1500, written=2600,
                                traffic=Traffic(110, 320)))
    totals = add(totals, sample(120.0, 57.5, read=1500, written=3000,
                                traffic=Traffic(210, 320)))
    assert totals.cpu_seconds == 7.5
    assert totals.running_seconds == 20.0
    assert (totals.disk_read_bytes, totals.disk_written_bytes) == (500, 1000)
    assert totals.adapters[MAC] == Traffic(200, 300)
    shown = report(totals, 130.0)
    assert shown.duration_seconds == 30.0
    assert shown.cpu_average_percent == 37.5  # 7.5 s of CPU in 20 s
    assert (shown.network_received_bytes, shown.network_sent_bytes) == (200, 300)


def test_what_ran_before_metering_began_is_not_counted() -> None:
    totals = begin(100.0, sample(100.0, 500.0, read=10**9, traffic=Traffic(10**6, 10**6)))
    shown = report(totals, 100.0)
    assert (shown.cpu_seconds, shown.disk_read_bytes, shown.network_received_bytes) == (0, 0, 0)


def test_a_new_process_counts_from_zero_since_it_started() -> None:
    totals = begin(100.0, sample(100.0, 40.0, read=5000))
    totals = add(totals, sample(110.0, 44.0, read=6000))
    # QEMU restarted at 150: its counters are small again, all of them count
    totals = add(totals, sample(160.0, 3.0, process="200:9", started=150.0, read=700,
                                traffic=Traffic(5, 6)))
    assert totals.cpu_seconds == 4.0 + 3.0
    assert totals.running_seconds == 10.0 + 10.0  # not the time it was off
    assert totals.disk_read_bytes == 1000 + 700
    assert totals.adapters[MAC] == Traffic(5, 6)


def test_a_counter_that_went_down_counts_from_zero() -> None:
    totals = begin(0.0, sample(0.0, 1.0, written=800, traffic=Traffic(1000, 1000)))
    # the same process, but the adapter's tap was made anew (reconnected)
    totals = add(totals, sample(10.0, 2.0, written=900, traffic=Traffic(30, 40)))
    assert totals.adapters[MAC] == Traffic(30, 40)
    assert totals.disk_written_bytes == 100


def test_a_device_added_later_counts_whole_and_a_removed_one_loses_nothing() -> None:
    first = Sample(0.0, "1:1", 0.0, 0.0, MIB, {"a": DiskIo(10, 10)})
    totals = begin(0.0, first)
    totals = add(totals, Sample(10.0, "1:1", 0.0, 0.0, MIB,
                                {"a": DiskIo(20, 30), "b": DiskIo(5, 7)}))
    totals = add(totals, Sample(20.0, "1:1", 0.0, 0.0, MIB, {"b": DiskIo(6, 9)}))
    assert (totals.disk_read_bytes, totals.disk_written_bytes) == (10 + 5 + 1, 20 + 7 + 2)


def test_metering_enabled_while_off_counts_the_next_process_whole() -> None:
    totals = begin(100.0)
    totals = add(totals, sample(130.0, 12.0, started=120.0, written=4096))
    assert (totals.cpu_seconds, totals.running_seconds, totals.disk_written_bytes) == (
        12.0, 10.0, 4096)


def test_a_running_vm_not_read_at_the_start_gives_only_a_base() -> None:
    totals = begin(100.0, running=True)
    totals = add(totals, sample(105.0, 90.0, started=10.0, written=10**6))
    assert (totals.cpu_seconds, totals.disk_written_bytes) == (0.0, 0)
    totals = add(totals, sample(115.0, 91.0, started=10.0, written=10**6 + 1))
    assert (totals.cpu_seconds, totals.disk_written_bytes) == (1.0, 1)


def test_memory_average_is_weighted_by_time_minimum_and_maximum_are_samples() -> None:
    totals = begin(0.0, sample(0.0, 0.0, memory=1000))
    totals = add(totals, sample(10.0, 0.0, memory=3000))  # mean 2000 for 10 s
    totals = add(totals, sample(40.0, 0.0, memory=3000))  # 3000 for 30 s
    shown = report(totals, 40.0)
    assert shown.memory_average_bytes == (2000 * 10 + 3000 * 30) // 40
    assert (shown.memory_min_bytes, shown.memory_max_bytes) == (1000, 3000)


def test_before_time_passed_the_average_is_the_one_sample() -> None:
    shown = report(begin(0.0, sample(0.0, 0.0, memory=777)), 0.0)
    assert shown.memory_average_bytes == 777
    assert shown.cpu_average_percent is None
    assert report(begin(0.0), 5.0).memory_average_bytes is None


def test_an_adapter_without_counters_is_reported_as_not_metered() -> None:
    totals = begin(0.0, sample(0.0, 0.0, user=True))
    totals = add(totals, sample(10.0, 0.0, traffic=Traffic(100, 200), user=True))
    shown = report(totals, 10.0)
    by_mac = {a.mac: a for a in shown.adapters}
    assert by_mac[USER_MAC].metered is False
    assert by_mac[USER_MAC].received_bytes is None
    assert (by_mac[MAC].received_bytes, by_mac[MAC].sent_bytes) == (100, 200)
    assert (shown.network_received_bytes, shown.network_sent_bytes) == (100, 200)


def test_totals_survive_their_json() -> None:
    totals = add(begin(0.0, sample(0.0, 1.0, user=True, traffic=Traffic(1, 2))),
                 sample(10.0, 2.5, memory=MIB, read=9, written=8, traffic=Traffic(3, 5),
                        user=True))
    assert Totals.from_json(totals.to_json()) == totals
    pending = begin(3.0, running=True)
    assert Totals.from_json(pending.to_json()) == pending


def test_a_clock_step_back_adds_no_negative_time() -> None:
    totals = begin(100.0, sample(100.0, 1.0))
    totals = add(totals, sample(90.0, 2.0))
    assert totals.running_seconds == 0.0
    assert totals.cpu_seconds == 1.0
