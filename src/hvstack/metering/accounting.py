"""Adding samples up: pure functions from raw counters to metering totals.

:func:`begin` starts metering (enabled or reset) at a moment, :func:`add` counts a new
:class:`~hvstack.metering.model.Sample` into the totals, :func:`report` reads them.

What is counted between two samples:

- the same worker process (same pid and start time) as the last sample: each counter's
  growth; a counter that went down was started again (a tap made anew, a device added
  again) and counts from zero;
- another process than the last sample's (QEMU was restarted, or the VM started after
  metering began): all of its counters, from zero, over the time since it started (or
  since metering began, if later);
- the first sample after metering began on a running VM whose counters could not be
  read then (``baseline_pending``): nothing; it becomes the base.

Memory is observed at each sample: minimum and maximum of the samples, and the average
weighted by the time between them (the mean of both ends for the same process).
"""

from __future__ import annotations

from dataclasses import replace

from hvstack.metering.model import AdapterReport, Report, Sample, Totals, Traffic


def _grew(before: int | float | None, now: int | float) -> float:
    """A cumulative counter's growth; one that went down (or is new) counts from zero."""
    if before is None or now < before:
        return now
    return now - before


def _memory(totals: Totals, memory: int, byte_seconds: float) -> Totals:
    low, high = totals.memory_min_bytes, totals.memory_max_bytes
    return replace(totals, memory_min_bytes=memory if low is None else min(low, memory),
                   memory_max_bytes=memory if high is None else max(high, memory),
                   memory_byte_seconds=totals.memory_byte_seconds + byte_seconds)


def _known_adapters(totals: Totals, sample: Sample) -> dict[str, Traffic | None]:
    """The totals' adapters with those ``sample`` shows for the first time (no bytes)."""
    adapters = dict(totals.adapters)
    for mac, counters in sample.adapters.items():
        if counters is not None and adapters.get(mac) is None:
            adapters[mac] = Traffic()
        elif mac not in adapters:
            adapters[mac] = None
    return adapters


def begin(now: float, sample: Sample | None = None, *, running: bool = False) -> Totals:
    """Metering enabled or reset at ``now``. ``sample``: the VM's counters now (the base
    of the next deltas); ``running`` without a sample: the VM runs but its counters could
    not be read, so the next sample of its process is only a base."""
    totals = Totals(started_at=now, baseline_pending=running and sample is None)
    if sample is None:
        return totals
    totals = replace(totals, last=sample, adapters=_known_adapters(totals, sample))
    return _memory(totals, sample.memory_bytes, 0.0)


def add(totals: Totals, sample: Sample) -> Totals:
    """``totals`` with what happened between their last sample and ``sample``."""
    last = totals.last
    if last is not None and last.process == sample.process:
        base: Sample | None = last
        since = last.at
    elif last is None and totals.baseline_pending:
        return begin(totals.started_at, sample) if sample.at >= totals.started_at else totals
    else:
        base = None
        since = max(sample.process_started_at, totals.started_at,
                    last.at if last is not None else totals.started_at)
    seconds = max(0.0, sample.at - since)
    read = written = 0.0
    for device, io in sample.disks.items():
        before = base.disks.get(device) if base is not None else None
        read += _grew(before.read if before else None, io.read)
        written += _grew(before.written if before else None, io.written)
    adapters = _known_adapters(totals, sample)
    for mac, counters in sample.adapters.items():
        if counters is None:
            continue
        earlier = base.adapters.get(mac) if base is not None else None
        now = adapters[mac] or Traffic()
        adapters[mac] = Traffic(
            now.received + int(_grew(earlier.received if earlier else None, counters.received)),
            now.sent + int(_grew(earlier.sent if earlier else None, counters.sent)))
    mean_memory = (sample.memory_bytes if base is None
                   else (base.memory_bytes + sample.memory_bytes) / 2)
    totals = replace(
        totals,
        cpu_seconds=totals.cpu_seconds + _grew(base.cpu_seconds if base else None,
                                               sample.cpu_seconds),
        running_seconds=totals.running_seconds + seconds,
        disk_read_bytes=totals.disk_read_bytes + int(read),
        disk_written_bytes=totals.disk_written_bytes + int(written),
        adapters=adapters, last=sample, baseline_pending=False)
    return _memory(totals, sample.memory_bytes, mean_memory * seconds)


def report(totals: Totals, now: float) -> Report:
    """The totals as Measure-VM shows them at ``now``."""
    running = totals.running_seconds
    if running > 0:
        average: int | None = round(totals.memory_byte_seconds / running)
    else:
        average = totals.last.memory_bytes if totals.last is not None else None
    adapters = tuple(
        AdapterReport(mac, traffic is not None,
                      None if traffic is None else traffic.received,
                      None if traffic is None else traffic.sent)
        for mac, traffic in sorted(totals.adapters.items()))
    return Report(
        started_at=totals.started_at, at=now,
        duration_seconds=max(0.0, now - totals.started_at), running_seconds=running,
        cpu_seconds=totals.cpu_seconds,
        cpu_average_percent=100.0 * totals.cpu_seconds / running if running > 0 else None,
        memory_average_bytes=average, memory_min_bytes=totals.memory_min_bytes,
        memory_max_bytes=totals.memory_max_bytes,
        disk_read_bytes=totals.disk_read_bytes, disk_written_bytes=totals.disk_written_bytes,
        network_received_bytes=sum(a.received_bytes or 0 for a in adapters),
        network_sent_bytes=sum(a.sent_bytes or 0 for a in adapters),
        adapters=adapters)
