"""Convergence policy of a live migration: pure functions, no I/O; worked examples in
the unit tests and in docs/live-migration.md ("Convergence").

* :class:`Settings`: the downtime limit to start with, the largest one it may be raised
  to, the ramp (steps, delay per GiB of RAM), auto-converge and post-copy permissions,
  the completion timeout per GiB. Out-of-range values raise :class:`InvalidInput`.
* :func:`downtime_steps`: the schedule ``((after_seconds, downtime_ms), ...)``: from the
  configured limit to the maximum, each step the same factor above the last (a
  geometric ramp), the steps spaced in proportion to the guest's RAM.
* :func:`estimate`: from one sample, whether pre-copy can converge (the guest dirties
  memory slower than the link sends it) and the downtime the rest would take now.
* :func:`decide`: one sample of ``query-migrate`` (as plain data) and what was already
  done (a :class:`State`) in, the :class:`Decision` out: the actions to take now and the
  state after them, which the caller passes to the next call.

The escalation, cheapest first: raise the downtime limit along the schedule (only while
the expected downtime is above the current limit: an idle guest finishes at the first
limit); when the remaining memory stops shrinking at the largest limit, or at once when
the guest dirties memory nearly as fast as the link sends it, turn on auto-converge (it
throttles the guest's CPUs); when that and the last downtime step did not help, switch to
post-copy (``auto``); past the completion timeout, switch to post-copy (``auto``) or,
with ``never`` and no progress, abort. Every escalation restarts the progress watch, so
the next one waits until this one had ``stall_iterations`` passes to show an effect.
A link that sends nothing never leads to post-copy (a guest running on the destination
with its memory behind a dead link is the one way to lose it): past the timeout it is
aborted, and the VM keeps running on the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from hvstack.errors import InvalidInput

GIB = 1024**3
# Below this the ramp would be shorter than the host's sampling period (about a second):
# a tiny guest is ramped as if it had 128 MiB.
MIN_SCALE_GIB = 0.125

PostcopyMode = Literal["auto", "never"]


def _check(ok: bool, message: str, **data: str | int | float) -> None:
    if not ok:
        raise InvalidInput(message, **data)


@dataclass(frozen=True)
class Settings:
    """How a migration is driven to completion.

    ``max_downtime_ms`` defaults to 2 s: a pause TCP connections, guest clocks (resynced
    by the integration services) and failover-cluster heartbeats (5 s and more) ride
    out, yet short enough that a user mostly does not notice; a guest that needs more
    goes to post-copy instead of a longer pause. The ramp (5 steps, 10 s per GiB) gives
    each step about one full pass of a GiB at 1 Gbit/s to show whether it helps; the
    completion timeout (150 s per GiB) comes after the ramp and auto-converge have had
    their turns.
    """

    downtime_ms: int = 300
    max_downtime_ms: int = 2000
    steps: int = 5
    step_delay_per_gib_s: float = 10.0
    auto_converge: bool = True
    postcopy: PostcopyMode = "auto"
    completion_timeout_per_gib_s: float = 150.0
    # Progress: the remaining memory must fall by this fraction within this many passes.
    progress_fraction: float = 0.1
    stall_iterations: int = 2
    # Auto-converge also when, after the first pass, the guest dirties memory at this
    # fraction of the bandwidth or more (each pass would shrink the rest too little).
    auto_converge_dirty_ratio: float = 0.8

    def __post_init__(self) -> None:
        _check(10 <= self.downtime_ms <= 60_000, "downtime limit must be 10..60000 ms",
               downtime_ms=self.downtime_ms)
        _check(self.downtime_ms <= self.max_downtime_ms <= 60_000,
               "maximum downtime must be between the downtime limit and 60000 ms",
               max_downtime_ms=self.max_downtime_ms)
        _check(1 <= self.steps <= 100, "downtime steps must be 1..100", steps=self.steps)
        _check(0 < self.step_delay_per_gib_s <= 3600,
               "step delay must be above 0 and at most 3600 s per GiB",
               step_delay_per_gib_s=self.step_delay_per_gib_s)
        _check(self.postcopy in ("auto", "never"), "post-copy must be auto or never",
               postcopy=str(self.postcopy))
        _check(self.steps * self.step_delay_per_gib_s < self.completion_timeout_per_gib_s
               <= 86_400, "completion timeout must come after the last downtime step "
               "(and be at most 86400 s per GiB)",
               completion_timeout_per_gib_s=self.completion_timeout_per_gib_s)
        _check(0 < self.progress_fraction < 1, "progress fraction must be between 0 and 1",
               progress_fraction=self.progress_fraction)
        _check(1 <= self.stall_iterations <= 100, "stall iterations must be 1..100",
               stall_iterations=self.stall_iterations)
        _check(0 < self.auto_converge_dirty_ratio <= 1,
               "auto-converge dirty ratio must be above 0 and at most 1",
               auto_converge_dirty_ratio=self.auto_converge_dirty_ratio)


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` answer as plain data; ``ram_total_bytes`` is 0 while QEMU
    has not reported the RAM yet (setup). ``iterations`` is QEMU's dirty-sync count (1
    during the first pass)."""

    elapsed_s: float
    ram_total_bytes: int = 0
    ram_remaining_bytes: int = 0
    ram_transferred_bytes: int = 0
    dirty_rate_bps: float = 0.0
    transfer_rate_bps: float = 0.0
    expected_downtime_ms: float | None = None
    iterations: int = 0


@dataclass(frozen=True)
class State:
    """What was already done, and the progress mark: the lowest remaining memory that
    counted as progress and the pass at which it was seen."""

    downtime_limit_ms: int
    auto_converge: bool = False
    postcopy_started: bool = False
    mark_remaining_bytes: int | None = None
    mark_iteration: int = 0

    @classmethod
    def initial(cls, settings: Settings) -> State:
        """The state at the start: the configured limit, nothing else turned on."""
        return cls(downtime_limit_ms=settings.downtime_ms)


@dataclass(frozen=True)
class Decision:
    """The actions to take now (none, some compatible ones, or exactly one of
    post-copy and abort), why, and the state after them."""

    state: State
    downtime_limit_ms: int | None = None
    auto_converge: bool = False
    start_postcopy: bool = False
    abort_reason: str | None = None
    reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        others = self.downtime_limit_ms is not None or self.auto_converge
        if self.abort_reason is not None and (others or self.start_postcopy):
            raise ValueError("an abort excludes every other action")
        if self.start_postcopy and others:
            raise ValueError("post-copy excludes every other action")

    @property
    def nothing(self) -> bool:
        """True when there is nothing to do now."""
        return not (self.downtime_limit_ms is not None or self.auto_converge
                    or self.start_postcopy or self.abort_reason is not None)


@dataclass(frozen=True)
class Estimate:
    """``converging`` is None while the rates are unknown (no bandwidth measured yet);
    ``expected_downtime_ms`` and ``dirty_ratio`` (the dirty rate over the bandwidth) are
    None when nothing is being sent."""

    converging: bool | None
    expected_downtime_ms: float | None
    dirty_ratio: float | None


def _scale_gib(ram_bytes: int) -> float:
    return max(ram_bytes / GIB, MIN_SCALE_GIB)


def downtime_steps(settings: Settings, ram_bytes: int) -> tuple[tuple[float, int], ...]:
    """The ramp: step ``i`` (0..steps) at ``i * delay`` seconds, with the limit
    ``downtime * (max / downtime) ** (i / steps)`` ms; the delay is the per-GiB delay
    times the RAM in GiB (at least :data:`MIN_SCALE_GIB`). Equal limits (maximum equal
    to the limit) collapse into the first step."""
    _check(ram_bytes >= 0, "RAM size must not be negative", ram_bytes=ram_bytes)
    delay = settings.step_delay_per_gib_s * _scale_gib(ram_bytes)
    growth = settings.max_downtime_ms / settings.downtime_ms
    schedule: list[tuple[float, int]] = []
    for i in range(settings.steps + 1):
        limit = round(settings.downtime_ms * growth ** (i / settings.steps))
        if i == settings.steps:
            limit = settings.max_downtime_ms  # exact, whatever the rounding
        if not schedule or limit > schedule[-1][1]:
            schedule.append((round(i * delay, 3), limit))
    return tuple(schedule)


def completion_timeout_s(settings: Settings, ram_bytes: int) -> float:
    """Seconds after which a migration that has not finished is escalated."""
    return settings.completion_timeout_per_gib_s * _scale_gib(ram_bytes)


def estimate(sample: Sample) -> Estimate:
    """Pre-copy converges when the guest dirties memory slower than the link sends it;
    the downtime of stopping now is the remaining memory over the bandwidth."""
    if sample.transfer_rate_bps <= 0:
        return Estimate(converging=None, expected_downtime_ms=None, dirty_ratio=None)
    ratio = sample.dirty_rate_bps / sample.transfer_rate_bps
    return Estimate(converging=ratio < 1, dirty_ratio=ratio,
                    expected_downtime_ms=sample.ram_remaining_bytes
                    / sample.transfer_rate_bps * 1000)


def _scheduled_limit(settings: Settings, sample: Sample) -> int:
    limit = settings.downtime_ms
    for after, step_limit in downtime_steps(settings, sample.ram_total_bytes):
        if sample.elapsed_s >= after:
            limit = step_limit
    return limit


def _track_progress(settings: Settings, sample: Sample, state: State) -> State:
    mark = state.mark_remaining_bytes
    if mark is None or sample.ram_remaining_bytes <= mark * (1 - settings.progress_fraction):
        return replace(state, mark_remaining_bytes=sample.ram_remaining_bytes,
                       mark_iteration=sample.iterations)
    return state


def _stalled(settings: Settings, sample: Sample, state: State) -> bool:
    return (sample.iterations >= 2
            and sample.iterations - state.mark_iteration >= settings.stall_iterations)


def _restart_watch(sample: Sample, state: State) -> State:
    return replace(state, mark_remaining_bytes=sample.ram_remaining_bytes,
                   mark_iteration=sample.iterations)


def decide(settings: Settings, sample: Sample, state: State) -> Decision:
    """The actions for this sample; pass ``decision.state`` to the next call (called
    again with it and the same sample, it returns nothing to do)."""
    if state.postcopy_started or sample.ram_total_bytes <= 0:
        return Decision(state=state)  # post-copy always completes; setup: nothing known
    state = _track_progress(settings, sample, state)
    est = estimate(sample)
    stalled = _stalled(settings, sample, state)
    sending = sample.transfer_rate_bps > 0
    if sample.elapsed_s >= completion_timeout_s(settings, sample.ram_total_bytes):
        if settings.postcopy == "auto" and sending:
            return Decision(state=replace(state, postcopy_started=True), start_postcopy=True,
                            reasons=("past the completion timeout: post-copy",))
        if not sending:  # a dead link stops the passes too: no stall to wait for
            return Decision(state=state,
                            abort_reason="past the completion timeout: nothing is being sent")
        if stalled:
            return Decision(state=state, abort_reason="past the completion timeout: no "
                            "progress and post-copy is not allowed")
    fits = (est.expected_downtime_ms is not None
            and est.expected_downtime_ms <= state.downtime_limit_ms)
    if not sending or fits:
        return Decision(state=state)  # rates unknown, or QEMU completes at this limit
    at_max = state.downtime_limit_ms >= settings.max_downtime_ms
    converge_done = state.auto_converge or not settings.auto_converge
    if stalled and at_max and converge_done and settings.postcopy == "auto":
        return Decision(state=replace(state, postcopy_started=True), start_postcopy=True,
                        reasons=("no progress at the largest downtime limit"
                                 + (" with auto-converge" if state.auto_converge else "")
                                 + ": post-copy",))
    reasons: list[str] = []
    new_limit: int | None = None
    scheduled = _scheduled_limit(settings, sample)
    if scheduled > state.downtime_limit_ms:
        new_limit = scheduled
        state = replace(_restart_watch(sample, state), downtime_limit_ms=scheduled)
        reasons.append(f"downtime step: limit {scheduled} ms")
    # The first pass sends everything once: its dirty rate says nothing yet.
    dirty_heavy = (sample.iterations >= 2 and est.dirty_ratio is not None
                   and est.dirty_ratio >= settings.auto_converge_dirty_ratio)
    # A plateau is what the downtime steps are for; only once they are spent does it
    # call for throttling the guest. Dirtying near the link's speed calls for it at once.
    turn_on = (settings.auto_converge and not state.auto_converge
               and ((stalled and at_max) or dirty_heavy))
    if turn_on:
        state = replace(_restart_watch(sample, state), auto_converge=True)
        reasons.append("auto-converge: " + ("no progress" if stalled
                                            else "the guest dirties memory too fast"))
    return Decision(state=state, downtime_limit_ms=new_limit, auto_converge=turn_on,
                    reasons=tuple(reasons))
