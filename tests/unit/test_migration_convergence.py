"""The convergence policy of a live migration by worked examples: a guest of 1 GiB on a
link of 100 MiB/s unless said otherwise (sizes in MiB). With the default settings its
downtime steps are 300, 438, 641, 936, 1369 and 2000 ms at 0, 10, ... 50 s, and its
completion timeout is 150 s. No I/O: just the decisions."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import pytest

from hvstack.errors import InvalidInput
from hvstack.migration.convergence import (
    GIB,
    Decision,
    Sample,
    Settings,
    State,
    completion_timeout_s,
    decide,
    downtime_steps,
    estimate,
)

MIB = 1024**2
DEFAULTS = Settings()


def sample(t: float, it: int, remaining: float, *, dirty: float = 0, bw: float = 100,
           total: float = 1024) -> Sample:
    """A sample at ``t`` s, pass ``it``, with ``remaining`` MiB to send, the guest dirtying
    ``dirty`` MiB/s and the link sending ``bw`` MiB/s."""
    return Sample(elapsed_s=t, ram_total_bytes=int(total * MIB),
                  ram_remaining_bytes=int(remaining * MIB),
                  ram_transferred_bytes=int((total - remaining) * MIB),
                  dirty_rate_bps=dirty * MIB, transfer_rate_bps=bw * MIB, iterations=it)


def run(samples: Iterable[Sample], settings: Settings = DEFAULTS) -> list[Decision]:
    """Decide on each sample in turn, threading the state as the host will; each decision
    must also be idempotent (deciding again on the same sample does nothing)."""
    state = State.initial(settings)
    decisions = []
    for s in samples:
        decision = decide(settings, s, state)
        again = decide(settings, s, decision.state)
        assert again.nothing or again.abort_reason == decision.abort_reason
        state = decision.state
        decisions.append(decision)
    return decisions


def actions(decision: Decision) -> str:
    """A short text of the decision's actions: ``-`` for none."""
    parts = []
    if decision.downtime_limit_ms is not None:
        parts.append(f"limit {decision.downtime_limit_ms}")
    if decision.auto_converge:
        parts.append("auto-converge")
    if decision.start_postcopy:
        parts.append("post-copy")
    if decision.abort_reason is not None:
        parts.append("abort")
    return ", ".join(parts) or "-"


# The schedule


def test_steps_ramp_geometrically_from_the_limit_to_the_maximum_over_time_per_gib() -> None:
    assert downtime_steps(DEFAULTS, GIB) == (
        (0, 300), (10, 438), (20, 641), (30, 936), (40, 1369), (50, 2000))
    assert downtime_steps(DEFAULTS, 4 * GIB) == (
        (0, 300), (40, 438), (80, 641), (120, 936), (160, 1369), (200, 2000))
    assert completion_timeout_s(DEFAULTS, 4 * GIB) == 600


def test_a_tiny_guest_is_ramped_as_if_it_had_128_mib() -> None:
    assert [after for after, _ in downtime_steps(DEFAULTS, 32 * MIB)] == [
        0, 1.25, 2.5, 3.75, 5, 6.25]
    assert completion_timeout_s(DEFAULTS, 0) == 150 / 8


def test_steps_of_other_settings() -> None:
    nova_like = Settings(downtime_ms=50, max_downtime_ms=500, steps=10,
                         step_delay_per_gib_s=75, completion_timeout_per_gib_s=800)
    steps = downtime_steps(nova_like, 2 * GIB)
    assert len(steps) == 11 and steps[0] == (0, 50) and steps[-1] == (1500, 500)
    assert all(a[1] < b[1] for a, b in pairwise(steps))
    # No room to grow: one step, the limit.
    assert downtime_steps(Settings(max_downtime_ms=300), GIB) == ((0, 300),)


# Worked examples


def test_an_idle_guest_finishes_at_the_first_limit() -> None:
    # The first pass sends the GiB; after it 20 MiB are left: 200 ms at 100 MiB/s.
    decisions = run([sample(1, 1, 924), sample(9, 1, 124),
                     sample(10.5, 2, 20, dirty=2), sample(60, 3, 20, dirty=2)])
    assert [actions(d) for d in decisions] == ["-", "-", "-", "-"]
    assert decisions[-1].state.downtime_limit_ms == 300


def test_a_busy_guest_converges_after_two_downtime_steps() -> None:
    # A 60 MiB working set rewritten at 50 MiB/s: the rest stays at 60 MiB (600 ms).
    decisions = run([sample(5, 1, 500), sample(10.5, 2, 60, dirty=50),
                     sample(12, 3, 58, dirty=50), sample(15, 5, 60, dirty=50),
                     sample(20.5, 9, 59, dirty=50), sample(22, 10, 60, dirty=50)])
    assert [actions(d) for d in decisions] == ["-", "limit 438", "-", "-", "limit 641", "-"]
    assert not decisions[-1].state.auto_converge  # 641 ms covers the 600 ms left


def test_a_step_skipped_while_the_rest_fit_is_taken_at_its_scheduled_value() -> None:
    # 25 MiB left (250 ms) until 35 s, then a burst leaves 90 MiB (900 ms): the limit goes
    # straight to the step due at 35 s (936 ms), not through the ones skipped.
    decisions = run([sample(10.5, 2, 25, dirty=10), sample(25, 6, 25, dirty=10),
                     sample(35, 7, 90, dirty=40)])
    assert [actions(d) for d in decisions] == ["-", "-", "limit 936"]


def test_a_guest_dirtying_near_the_link_speed_gets_auto_converge_at_once() -> None:
    decisions = run([sample(5, 1, 500, dirty=90), sample(10.5, 2, 400, dirty=90),
                     sample(12, 3, 380, dirty=90)])
    assert [actions(d) for d in decisions] == ["-", "limit 438, auto-converge", "-"]
    assert "too fast" in decisions[1].reasons[1]


def test_a_plateau_above_the_largest_limit_needs_auto_converge() -> None:
    # 300 MiB left over and over (3000 ms): the steps run out, then the guest is throttled,
    # which brings the rest down to 150 MiB (1500 ms): QEMU completes.
    samples = [sample(t, it, 300, dirty=50) for t, it in
               [(5, 2), (10, 3), (20, 4), (30, 5), (40, 6), (50, 7), (52, 8), (54, 9)]]
    samples.append(sample(56, 10, 150, dirty=20))
    decisions = run(samples)
    assert [actions(d) for d in decisions] == [
        "-", "limit 438", "limit 641", "limit 936", "limit 1369", "limit 2000", "-",
        "auto-converge", "-"]
    assert decisions[7].reasons == ("auto-converge: no progress",)


def test_a_guest_auto_converge_cannot_tame_ends_in_post_copy() -> None:
    samples = [sample(t, it, 300, dirty=50) for t, it in
               [(5, 2), (10, 3), (20, 4), (30, 5), (40, 6), (50, 7), (52, 8), (54, 9),
                (56, 10), (58, 11), (60, 12)]]
    decisions = run(samples)
    assert [actions(d) for d in decisions][5:] == [
        "limit 2000", "-", "auto-converge", "-", "post-copy", "-"]
    assert decisions[-1].state.postcopy_started


def test_past_the_timeout_auto_switches_to_post_copy_even_while_progressing() -> None:
    decisions = run([sample(149, 40, 400, dirty=40), sample(150, 41, 300, dirty=40)])
    assert actions(decisions[1]) == "post-copy"
    assert decisions[1].reasons == ("past the completion timeout: post-copy",)


def test_never_keeps_going_while_progressing_and_aborts_when_stalled_past_the_timeout() -> None:
    never = Settings(postcopy="never")
    samples = [sample(t, it, 300, dirty=50) for t, it in
               [(5, 2), (10, 3), (20, 4), (30, 5), (40, 6), (50, 7), (52, 8), (54, 9),
                (56, 10), (58, 11)]]
    samples += [sample(150, 40, 200, dirty=50), sample(151, 41, 210, dirty=50),
                sample(152, 42, 205, dirty=50)]
    decisions = run(samples, never)
    # No post-copy at the plateau; past the timeout the fall to 200 MiB is progress
    # (one more chance); two passes without it end the migration.
    assert [actions(d) for d in decisions][7:] == ["auto-converge", "-", "-", "-", "-",
                                                   "abort"]
    assert decisions[-1].abort_reason == (
        "past the completion timeout: no progress and post-copy is not allowed")


def test_samples_before_the_total_is_known_do_nothing() -> None:
    state = State.initial(DEFAULTS)
    setup = Sample(elapsed_s=500)  # QEMU in setup: no RAM figures yet, even past any timeout
    decision = decide(DEFAULTS, setup, state)
    assert decision.nothing and decision.state == state


def test_zero_bandwidth_never_leads_to_post_copy_but_aborts_past_the_timeout() -> None:
    stuck = [sample(20, 2, 300, bw=0), sample(40, 2, 300, bw=0), sample(150, 2, 300, bw=0)]
    decisions = run(stuck)
    assert [actions(d) for d in decisions] == ["-", "-", "abort"]
    assert decisions[-1].abort_reason == "past the completion timeout: nothing is being sent"
    assert not decisions[-1].state.postcopy_started


def test_after_post_copy_nothing_more_is_done() -> None:
    state = State(downtime_limit_ms=2000, auto_converge=True, postcopy_started=True)
    assert decide(DEFAULTS, sample(10_000, 99, 900, dirty=500), state).nothing


def test_without_auto_converge_the_plateau_goes_straight_to_post_copy() -> None:
    settings = Settings(auto_converge=False)
    samples = [sample(t, it, 300, dirty=95) for t, it in
               [(5, 2), (10, 3), (20, 4), (30, 5), (40, 6), (50, 7), (52, 8), (54, 9)]]
    assert [actions(d) for d in run(samples, settings)][5:] == ["limit 2000", "-",
                                                                "post-copy"]


# The estimate and the decision's shape


def test_estimate() -> None:
    est = estimate(sample(10, 2, 100, dirty=50, bw=200))
    assert (est.converging, est.expected_downtime_ms, est.dirty_ratio) == (True, 500, 0.25)
    assert estimate(sample(10, 2, 100, dirty=200, bw=200)).converging is False
    unknown = estimate(sample(10, 2, 100, bw=0))
    assert (unknown.converging, unknown.expected_downtime_ms, unknown.dirty_ratio) == (
        None, None, None)


def test_a_decision_never_holds_conflicting_actions() -> None:
    state = State.initial(DEFAULTS)
    with pytest.raises(ValueError):
        Decision(state=state, start_postcopy=True, downtime_limit_ms=500)
    with pytest.raises(ValueError):
        Decision(state=state, abort_reason="x", start_postcopy=True)
    with pytest.raises(ValueError):
        Decision(state=state, abort_reason="x", auto_converge=True)


@pytest.mark.parametrize("bad", [
    {"downtime_ms": 5}, {"downtime_ms": 0}, {"max_downtime_ms": 200},
    {"max_downtime_ms": 70_000}, {"steps": 0}, {"step_delay_per_gib_s": 0},
    {"step_delay_per_gib_s": -1}, {"postcopy": "always"},
    {"completion_timeout_per_gib_s": 50}, {"progress_fraction": 0},
    {"progress_fraction": 1}, {"stall_iterations": 0}, {"auto_converge_dirty_ratio": 0},
    {"auto_converge_dirty_ratio": 1.5},
])
def test_bad_settings_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        Settings(**bad)  # type: ignore[arg-type]


def test_a_negative_ram_size_is_rejected() -> None:
    with pytest.raises(InvalidInput):
        downtime_steps(DEFAULTS, -1)
