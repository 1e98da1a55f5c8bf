"""Screen images: read QEMU's PPM screendumps, scale them down, write them as PNG.

Pure functions, no I/O. QEMU writes a binary PPM (``P6``, 8-bit RGB) on every build;
PNG support in QEMU needs libpng and gives no access to the pixels, which a thumbnail
needs. PNG is written by hand: the signature, then IHDR, IDAT (rows with filter byte 0,
deflated by zlib) and IEND chunks, each with a CRC-32 (RFC 2083).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_DIMENSION = 16384  # bigger than any display QEMU draws; guards against a bogus header


class ImageError(ValueError):
    """The data is not an image this module understands."""


@dataclass(frozen=True)
class Pixmap:
    """An 8-bit RGB image: ``rgb`` holds ``height`` rows of ``width * 3`` bytes."""

    width: int
    height: int
    rgb: bytes

    def __post_init__(self) -> None:
        if not (0 < self.width <= MAX_DIMENSION and 0 < self.height <= MAX_DIMENSION):
            raise ImageError(f"image size {self.width}x{self.height} is out of range")
        if len(self.rgb) != self.width * self.height * 3:
            raise ImageError(
                f"{self.width}x{self.height} RGB needs {self.width * self.height * 3} bytes, "
                f"got {len(self.rgb)}"
            )

    def row(self, y: int) -> bytes:
        stride = self.width * 3
        return self.rgb[y * stride:(y + 1) * stride]


def _ppm_fields(data: bytes, count: int) -> tuple[list[int], int]:
    """Read ``count`` whitespace-separated decimal header fields after the magic; return
    them and the offset of the byte after the single whitespace that ends the header."""
    fields: list[int] = []
    pos = 2
    while len(fields) < count:
        if pos >= len(data):
            raise ImageError("PPM header is truncated")
        char = data[pos:pos + 1]
        if char.isspace():
            pos += 1
        elif char == b"#":
            end = data.find(b"\n", pos)
            if end < 0:
                raise ImageError("PPM header is truncated")
            pos = end + 1
        elif char.isdigit():
            start = pos
            while pos < len(data) and data[pos:pos + 1].isdigit():
                pos += 1
            if pos - start > 6:
                raise ImageError("PPM header field is too long")
            fields.append(int(data[start:pos]))
        else:
            raise ImageError(f"unexpected byte {char!r} in the PPM header")
    if not data[pos:pos + 1].isspace():
        raise ImageError("PPM header does not end with whitespace")
    return fields, pos + 1


def parse_ppm(data: bytes) -> Pixmap:
    """Parse a binary PPM (``P6``) with a maximum value of 255."""
    if data[:2] != b"P6":
        raise ImageError("not a binary PPM (P6) image")
    (width, height, maxval), offset = _ppm_fields(data, 3)
    if maxval != 255:
        raise ImageError(f"PPM maximum value {maxval} is not supported (only 255)")
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise ImageError(f"PPM size {width}x{height} is out of range")
    size = width * height * 3
    pixels = data[offset:offset + size]
    if len(pixels) != size:
        raise ImageError(f"PPM pixel data is truncated ({len(pixels)} of {size} bytes)")
    return Pixmap(width, height, pixels)


def scale_to_width(image: Pixmap, max_width: int) -> Pixmap:
    """Shrink ``image`` to at most ``max_width`` pixels wide, keeping its aspect ratio
    (nearest neighbour: cheap in pure Python, and enough for a thumbnail). An image that
    is already narrow enough is returned as it is."""
    if max_width < 1:
        raise ImageError("the maximum width must be at least 1")
    if image.width <= max_width:
        return image
    width = max_width
    height = max(1, round(image.height * width / image.width))
    columns = [(2 * x + 1) * image.width // (2 * width) for x in range(width)]
    rows: list[bytes] = []
    for y in range(height):
        source = image.row((2 * y + 1) * image.height // (2 * height))
        rows.append(b"".join(source[3 * c:3 * c + 3] for c in columns))
    return Pixmap(width, height, b"".join(rows))


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def encode_png(image: Pixmap, level: int = 6) -> bytes:
    """Encode ``image`` as an 8-bit RGB, non-interlaced PNG."""
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + image.row(y) for y in range(image.height))
    return b"".join((
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(raw, level)),
        _chunk(b"IEND", b""),
    ))


def png_size(data: bytes) -> tuple[int, int]:
    """The width and height in a PNG's IHDR chunk (for checks and tests)."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ImageError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def ppm_to_png(data: bytes, max_width: int | None = None) -> bytes:
    """A PPM screendump as PNG, shrunk to ``max_width`` when given."""
    image = parse_ppm(data)
    if max_width is not None:
        image = scale_to_width(image, max_width)
    return encode_png(image)
