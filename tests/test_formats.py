"""Grayscale, alpha, 16-bit, palette, CMYK and the other formats all become (224, 224, 3) uint8 crops."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from worker.pipeline.preprocess import decode_and_crop
from worker.sidecar import Preprocessing

PREP = Preprocessing()


@pytest.fixture(scope="module")
def cat_rgb(photos) -> np.ndarray:
    return photos["cat"]


@pytest.fixture(scope="module")
def cat_crop(cat_rgb) -> np.ndarray:
    return decode_and_crop(cv2.imencode(".png", cat_rgb[..., ::-1])[1].tobytes(), PREP)


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def close(a: np.ndarray, b: np.ndarray, mean_grey: float) -> bool:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()) <= mean_grey


def test_grayscale_becomes_three_equal_channels(cat_rgb):
    gray = cv2.cvtColor(cat_rgb, cv2.COLOR_RGB2GRAY)
    for data in (cv2.imencode(".png", gray)[1].tobytes(), cv2.imencode(".jpg", gray)[1].tobytes()):
        crop = decode_and_crop(data, PREP)
        assert crop.shape == (224, 224, 3)
        assert np.array_equal(crop[..., 0], crop[..., 1]) and np.array_equal(crop[..., 1], crop[..., 2])


def test_alpha_channel_is_dropped_like_pil_convert_rgb(cat_rgb, cat_crop):
    rgba = np.dstack([cat_rgb, np.full(cat_rgb.shape[:2], 128, np.uint8)])
    crop = decode_and_crop(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), PREP)
    assert np.array_equal(crop, cat_crop)


def test_sixteen_bit_png_is_scaled_to_eight_bits(cat_rgb, cat_crop):
    deep = cat_rgb[..., ::-1].astype(np.uint16) * 257
    crop = decode_and_crop(cv2.imencode(".png", deep)[1].tobytes(), PREP)
    assert crop.dtype == np.uint8 and close(crop, cat_crop, 1.0)


def test_palette_png_and_gif_are_expanded(cat_rgb, cat_crop):
    palette = Image.fromarray(cat_rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    for fmt in ("PNG", "GIF"):
        crop = decode_and_crop(pil_bytes(palette, fmt), PREP)
        assert crop.shape == (224, 224, 3) and close(crop, cat_crop, 12.0), fmt


def test_cmyk_jpeg_decodes_to_the_same_picture(cat_rgb, cat_crop):
    data = pil_bytes(Image.fromarray(cat_rgb).convert("CMYK"), "JPEG", quality=95)
    crop = decode_and_crop(data, PREP)
    assert crop.shape == (224, 224, 3) and close(crop, cat_crop, 12.0)


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tiff", ".ppm"])
def test_other_formats(cat_rgb, cat_crop, ext):
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    data = cv2.imencode(ext, cat_rgb[..., ::-1], params)[1].tobytes()
    assert close(decode_and_crop(data, PREP), cat_crop, 1.0)


def test_exif_orientation_is_ignored_like_torchvision(cat_rgb):
    """torchvision's PIL loader does not rotate by EXIF; neither do we, or labels would differ."""
    image = Image.fromarray(cat_rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW"
    plain = decode_and_crop(pil_bytes(image, "JPEG", quality=95), PREP)
    tagged = decode_and_crop(pil_bytes(image, "JPEG", quality=95, exif=exif.tobytes()), PREP)
    assert np.array_equal(plain, tagged)


def test_exact_resize_policy_keeps_the_whole_image(cat_rgb):
    prep = Preprocessing(crop_size=(64, 64), resize_size=64, resize="exact")
    crop = decode_and_crop(cv2.imencode(".png", cat_rgb[..., ::-1])[1].tobytes(), prep)
    expected = cv2.resize(cat_rgb[..., ::-1], (64, 64), interpolation=cv2.INTER_AREA)
    assert crop.shape == (64, 64, 3) and close(crop, expected, 4.0)
