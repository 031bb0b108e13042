"""Image dimensions from the first bytes, without decoding.

Reading the header first lets the worker refuse decompression bombs before OpenCV allocates the
canvas, and pick a reduced-resolution JPEG decode. JPEG and PNG (nearly every input) are parsed by
hand in microseconds; other formats fall back to Pillow's lazy open, which also reads only the header.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

_JPEG_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> ImageHeader | None:
    """Return format and size, or None when no known header is found."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_header(data)
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader("PNG", width, height)
    return _pillow_header(data)


def _jpeg_header(data: bytes) -> ImageHeader | None:
    pos = 2
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF_MARKERS:
            if pos + 9 > end:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageHeader("JPEG", width, height)
        pos += 2 + length
    return None


def _pillow_header(data: bytes) -> ImageHeader | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return ImageHeader(image.format or "unknown", width, height)
    except Exception:  # noqa: BLE001 - any failure means "no header we understand"
        return None


def jpeg_has_end_marker(data: bytes) -> bool:
    """A complete JPEG ends with EOI (FFD9), possibly followed by a little padding.

    libjpeg decodes a truncated file into a grey-padded image with only a warning, so truncation
    has to be detected here to report it instead of labeling half a picture.
    """
    return b"\xff\xd9" in data[-4096:]
