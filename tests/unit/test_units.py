"""Sizes: parse_size and format_size, worked examples."""

from __future__ import annotations

import pytest

from hvstack.errors import InvalidInput
from hvstack.units import MAX_SIZE, format_size, parse_size

K, M, G, T, P = (1024**n for n in range(1, 6))


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0),
    ("512", 512),
    ("512B", 512),
    ("1K", K),
    ("1k", K),
    ("1KB", K),
    ("1KiB", K),
    ("1kib", K),
    ("512M", 512 * M),
    ("512 MiB", 512 * M),
    (" 2G ", 2 * G),
    ("2GiB", 2 * G),
    ("20g", 20 * G),
    ("1.5K", 1536),
    ("1.5G", 3 * G // 2),
    ("1.5TiB", 3 * T // 2),
    ("0.5M", 512 * K),
    ("1P", P),
    ("1024P", MAX_SIZE),
    (4096, 4096),
    (0, 0),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "lots",
    "",
    "   ",
    "-1G",
    "-1",
    "1.5",        # 1.5 bytes is not a whole number of bytes
    "0.1K",       # 102.4 bytes
    "1e3",
    "1X",
    "1 GB extra",
    "G",
    "1.G",
    "0x10",
    "1,5G",
    "1025P",      # more than MAX_SIZE
    "9" * 30 + "P",
    -1,
    True,         # a bool is not a size
])
def test_parse_size_refuses(text: str | int) -> None:
    with pytest.raises(InvalidInput):
        parse_size(text)


def test_parse_size_message_names_what_and_value() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_size("lots", what="memory")
    assert "memory 'lots' is not a size" in info.value.message
    assert info.value.data["value"] == "lots"


@pytest.mark.parametrize(("text", "unit", "hint"), [
    ("512", "M", "memory '512' means 512 bytes: did you mean 512M?"),
    (" 2048 ", "M", "memory ' 2048 ' means 2048 bytes: did you mean 2048M?"),
    ("20", "G", "memory '20' means 20 bytes: did you mean 20G?"),
])
def test_a_bare_number_that_is_surely_a_slip_gets_a_hint(text: str, unit: str,
                                                         hint: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_size(text, what="memory", bare_unit=unit)
    assert info.value.message == hint


@pytest.mark.parametrize("text", ["512B", "512K", "1048576", "1M", 512])
def test_sizes_with_a_unit_or_large_enough_get_no_hint(text: str | int) -> None:
    parse_size(text, what="memory", bare_unit="M")


def test_parse_size_absurdly_long_number_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        parse_size("9" * 400)


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (K, "1 KiB"),
    (1536, "1.5 KiB"),
    (512 * M, "512 MiB"),
    (G, "1 GiB"),
    (3 * G // 2, "1.5 GiB"),
    (20 * G, "20 GiB"),
    (T, "1 TiB"),
    (P, "1024 TiB"),          # TiB is the largest unit
    (G + 1, "1 GiB"),         # one decimal, trailing zeros dropped
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [K, 512 * M, 2 * G, 3 * G // 2, 7 * T])
def test_format_then_parse_round_trips(size: int) -> None:
    number, unit = format_size(size).split()
    assert parse_size(number + unit) == size


@pytest.mark.parametrize("size", [2**53 + 1, 2**60 - 1])
def test_parse_size_is_exact_for_large_byte_counts(size: int) -> None:
    assert parse_size(str(size)) == size
