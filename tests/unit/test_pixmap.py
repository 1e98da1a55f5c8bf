"""PPM parsing, thumbnail scaling and the hand-written PNG encoder.

The PNG checks decode the file independently here: chunk framing and CRCs, the IHDR
fields, and the deflated rows (filter byte 0) against the original pixels.
"""

from __future__ import annotations

import struct
import zlib

import pytest

from hvstack.pixmap import (
    PNG_SIGNATURE,
    ImageError,
    Pixmap,
    encode_png,
    parse_ppm,
    png_size,
    ppm_to_png,
    scale_to_width,
)


def gradient(width: int, height: int) -> Pixmap:
    rgb = bytes(v for y in range(height) for x in range(width)
                for v in (x % 256, y % 256, (x + y) % 256))
    return Pixmap(width, height, rgb)


def ppm(image: Pixmap, header: bytes | None = None) -> bytes:
    return (header or f"P6\n{image.width} {image.height}\n255\n".encode()) + image.rgb


def decode_png(data: bytes) -> tuple[dict[str, int], bytes]:
    """IHDR fields and the raw pixel rows of an 8-bit RGB PNG with filter 0 rows."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    header = {"width": width, "height": height, "depth": depth, "colour": colour,
              "compression": compression, "filter": filtering, "interlace": interlace}
    raw = zlib.decompress(chunks[1][1])
    stride = width * 3 + 1
    assert len(raw) == stride * height
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return header, b"".join(row[1:] for row in rows)


def test_png_round_trip() -> None:
    image = gradient(37, 11)
    header, pixels = decode_png(encode_png(image))
    assert header == {"width": 37, "height": 11, "depth": 8, "colour": 2, "compression": 0,
                      "filter": 0, "interlace": 0}
    assert pixels == image.rgb
    assert png_size(encode_png(image)) == (37, 11)


def test_ppm_header_with_comments_and_odd_whitespace() -> None:
    image = gradient(4, 3)
    parsed = parse_ppm(ppm(image, b"P6 # made by QEMU\n4\t3\r\n# max\n255 "))
    assert parsed == image


@pytest.mark.parametrize("data, why", [
    (b"P3\n1 1\n255\n000", "not a binary PPM"),
    (b"P6\n2 2\n65535\n" + b"\0" * 24, "maximum value"),
    (b"P6\n2 2\n255\n" + b"\0" * 11, "truncated"),
    (b"P6\n0 2\n255\n", "out of range"),
    (b"P6\n99999999 1\n255\n", "too long"),
    (b"P6\n2 2", "truncated"),
    (b"P6\n2 x\n255\n", "unexpected byte"),
])
def test_bad_ppm_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ImageError, match=why):
        parse_ppm(data)


def test_scaling_keeps_the_aspect_ratio_and_picks_centre_samples() -> None:
    image = gradient(720, 400)
    thumb = scale_to_width(image, 180)
    assert (thumb.width, thumb.height) == (180, 100)
    # pixel (x, y) of the thumbnail is the source pixel at the centre of its 4x4 block
    for x, y in ((0, 0), (179, 99), (50, 20)):
        sx, sy = 4 * x + 2, 4 * y + 2
        assert thumb.rgb[3 * (y * 180 + x):3 * (y * 180 + x) + 3] == \
            image.rgb[3 * (sy * 720 + sx):3 * (sy * 720 + sx) + 3]
    assert scale_to_width(image, 720) is image  # never enlarged
    assert scale_to_width(image, 5000) is image
    assert scale_to_width(gradient(1000, 1), 10).height == 1


def test_ppm_to_png_with_a_thumbnail_width() -> None:
    image = gradient(640, 480)
    assert png_size(ppm_to_png(ppm(image))) == (640, 480)
    header, pixels = decode_png(ppm_to_png(ppm(image), max_width=160))
    assert (header["width"], header["height"]) == (160, 120)
    assert pixels == scale_to_width(image, 160).rgb


def test_pixmap_checks_its_size() -> None:
    with pytest.raises(ImageError):
        Pixmap(2, 2, b"\0" * 11)
    with pytest.raises(ImageError):
        png_size(b"GIF89a" + b"\0" * 30)
