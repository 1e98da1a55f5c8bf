"""The one progress-callback type of hvstack, and helpers to nest and silence it.

``progress(percent, message)``: ``percent`` is 0..100 for the whole of the work the
callee was given; ``message`` says what is being done now, and an empty message keeps
the previous one (a job shows the last non-empty message). Long work that has parts
gives each part a slice with :func:`scaled`::

    await copy_disk(..., scaled(progress, 0, 80, "copying"))
    await verify(..., scaled(progress, 80, 100))
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def no_progress(percent: float, message: str) -> None:
    """A :data:`Progress` that shows nothing."""


def scaled(progress: Progress, start: float, end: float, message: str | None = None) -> Progress:
    """Map a callee's 0..100 onto ``start..end`` of ``progress``.

    With ``message``, the callee's own messages are replaced by it (a qemu-img run says
    nothing; its caller knows it is "converting").
    """

    def report(percent: float, text: str) -> None:
        clamped = max(0.0, min(100.0, percent))
        progress(start + (end - start) * clamped / 100.0, text if message is None else message)

    return report
