"""Bytes -> uint8 crop, the only per-image work the CPU does.

The crop matches torchvision's Resize(resize_size) + CenterCrop(crop_size) geometry (or a plain
resize for `resize="exact"`), computed in source coordinates so only the pixels that survive the
crop are resampled: crop region first, then one resize. JPEGs at least twice the target size are
decoded at reduced resolution (libjpeg DCT scaling), which is faster than a full decode and acts
as an anti-aliasing prefilter. The result stays uint8 in the decoder's BGR order: normalization,
channel order and layout are done by the model graph, as the sidecar records.

Measured differences from the torchvision/PIL reference are in README and bench/RESULTS.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from worker.pipeline.errors import ImageError
from worker.pipeline.image_header import ImageHeader, jpeg_has_end_marker, read_header
from worker.records import ErrorCode
from worker.setting_table import default
from worker.sidecar import Preprocessing

DEFAULT_MAX_PIXELS: int = default("max_pixels")
# OpenCV reads its own pixel cap once, when cv2 loads: set it before the import as a second line of
# defence for formats whose header we cannot read.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


@dataclass(frozen=True)
class CropPlan:
    """The crop in original-image coordinates and the size of the resized image it comes from."""

    resized_width: int
    resized_height: int
    left: int
    top: int
    crop_width: int
    crop_height: int
    reduce_factor: int

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the crop in an image of this size (original or reduced)."""
        sx = width / self.resized_width
        sy = height / self.resized_height
        return (
            self.left * sx,
            self.top * sy,
            (self.left + self.crop_width) * sx,
            (self.top + self.crop_height) * sy,
        )

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in whole pixels, at least one pixel wide: the region both the
        OpenCV path and the GPU decode stage cut before their one resize, so they cut the same."""
        x0, y0, x1, y1 = self.source_box(width, height)
        left, top = max(0, int(round(x0))), max(0, int(round(y0)))
        right, bottom = min(width, max(left + 1, int(round(x1)))), min(height, max(top + 1, int(round(y1))))
        return left, top, right, bottom


def plan_crop(header: ImageHeader, prep: Preprocessing, allow_reduced: bool = True) -> CropPlan:
    """torchvision's Resize + CenterCrop arithmetic, plus the reduced-decode factor for JPEGs."""
    crop_h, crop_w = prep.crop_size
    w, h = header.width, header.height
    if prep.resize == "exact":
        resized_w, resized_h, left, top = crop_w, crop_h, 0, 0
        target_short = min(crop_w, crop_h)
        short_side = min(w, h)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = prep.resize_size, int(prep.resize_size * long / short)
        resized_w, resized_h = (new_short, new_long) if w <= h else (new_long, new_short)
        left = int(round((resized_w - crop_w) / 2.0))
        top = int(round((resized_h - crop_h) / 2.0))
        target_short, short_side = prep.resize_size, short
    factor = 1
    if allow_reduced and header.format == "JPEG":
        for candidate in (8, 4, 2):
            if short_side / candidate >= target_short:
                factor = candidate
                break
    return CropPlan(resized_w, resized_h, left, top, crop_w, crop_h, factor)


def decode_and_crop(
    data: bytes,
    prep: Preprocessing,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_reduced: bool = True,
) -> np.ndarray:
    """Return a (crop_h, crop_w, 3) uint8 BGR crop, or raise ImageError."""
    header = checked_header(data, max_pixels)
    plan = plan_crop(header, prep, allow_reduced) if header else None
    image = _decode(data, header, plan.reduce_factor if plan else 1)
    if plan is None:  # size known only now; OpenCV's own pixel cap applied to the decode
        plan = plan_crop(ImageHeader("unknown", image.shape[1], image.shape[0]), prep, False)
    return crop_resize(image, plan)


def checked_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader | None:
    """The header, after the checks every decoder needs in front of it (impossible or too large
    sizes, truncated JPEGs); None when no known header is found. Raises ImageError."""
    header = read_header(data)
    if header is not None:
        if header.width <= 0 or header.height <= 0:
            raise ImageError(ErrorCode.DECODE_FAILED, f"header claims {header.width}x{header.height}")
        if header.pixels > max_pixels:
            raise ImageError(
                ErrorCode.TOO_LARGE,
                f"{header.width}x{header.height} is {header.pixels} pixels, over the {max_pixels} cap",
            )
        if header.format == "JPEG" and not jpeg_has_end_marker(data):
            raise ImageError(ErrorCode.DECODE_FAILED, "truncated JPEG (no end-of-image marker)")
    return header


def _decode(data: bytes, header: ImageHeader | None, reduce_factor: int) -> np.ndarray:
    flags = _REDUCED_FLAGS[reduce_factor] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ImageError(ErrorCode.DECODE_FAILED, f"OpenCV could not decode: {exc.err}") from None
    if image is None or image.size == 0:
        kind = header.format if header else "not a recognised image format"
        raise ImageError(ErrorCode.DECODE_FAILED, f"could not decode ({kind})")
    if image.dtype != np.uint8:  # IMREAD_COLOR already converts, but stay defensive
        image = cv2.convertScaleAbs(image, alpha=255.0 / float(np.iinfo(image.dtype).max))
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def crop_resize(image: np.ndarray, plan: CropPlan, interpolation: int | None = None) -> np.ndarray:
    """Cut the source region of the crop from `image` (any decoded size) and resize it once.

    Downscales by 2x or more use INTER_AREA (anti-aliased); the rest use INTER_LINEAR, which is
    cheap and, after a reduced decode, close to PIL's anti-aliased bilinear. `interpolation`
    overrides the choice (the shortcut benchmark compares them).
    """
    height, width = image.shape[:2]
    left, top, right, bottom = plan.pixel_box(width, height)
    region = image[top:bottom, left:right]
    ratio = min((right - left) / plan.crop_width, (bottom - top) / plan.crop_height)
    if interpolation is None:
        interpolation = cv2.INTER_AREA if ratio >= 2.0 else cv2.INTER_LINEAR
    out = cv2.resize(region, (plan.crop_width, plan.crop_height), interpolation=interpolation)
    return np.ascontiguousarray(out)


__all__ = ["CropPlan", "DEFAULT_MAX_PIXELS", "checked_header", "crop_resize", "decode_and_crop", "plan_crop"]
