"""Sizes: parsing "512M", "2GiB", "1.5T" into bytes and formatting bytes for people.

Binary multiples throughout (as Hyper-V and QEMU use them): K, KB and KiB all mean 1024.
A plain number is bytes. Negative, fractional-byte, empty and unknown-unit sizes are
:class:`~hvstack.errors.InvalidInput`. Where a plain number of bytes is surely a slip
(``--memory 512``), ``bare_unit`` makes one below 1 MiB an error that says what was
probably meant ("did you mean 512M?").
"""

from __future__ import annotations

import re
from decimal import Decimal

from hvstack.errors import InvalidInput

_UNITS = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 60


def parse_size(text: str | int, *, what: str = "size", bare_unit: str | None = None) -> int:
    """Return the size in bytes that ``text`` names; raise InvalidInput if it names none.

    With ``bare_unit`` (e.g. "M"), a number without a unit below 1 MiB is refused with a
    hint that adds that unit."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidInput(f"{what} must not be negative: {text}", value=text)
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise InvalidInput(
            f"{what} '{text}' is not a size; use a number with an optional unit "
            "such as 512M, 20G or 1.5TiB",
            value=str(text),
        )
    number, unit = match.groups()
    if len(number) > 30:
        raise InvalidInput(f"{what} '{text}' is too large", value=str(text)[:40])
    # Decimal, not float: byte counts past 2**53 must not be rounded.
    value = Decimal(number) * (1024 ** _UNITS[unit.upper()])
    if value > MAX_SIZE:
        raise InvalidInput(f"{what} '{text}' is too large", value=str(text))
    if value != value.to_integral_value():
        raise InvalidInput(f"{what} '{text}' is not a whole number of bytes", value=str(text))
    if bare_unit and not unit and value < 1024 * 1024 and not str(text).strip().upper(
            ).endswith("B"):
        raise InvalidInput(f"{what} '{text}' means {value} bytes: did you mean "
                           f"{number}{bare_unit}?", value=str(text))
    return int(value)


def format_size(size: int) -> str:
    """Return ``size`` bytes as a short human string: 536870912 -> '512 MiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
