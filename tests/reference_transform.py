"""torchvision's evaluation transform, reproduced with Pillow and NumPy for the parity tests.

torchvision is not a test dependency (it only ships with a 5.5 GB CUDA torch here), so this follows
its code for PIL inputs line by line: Resize(256) computes the new size with
`_compute_resized_output_size` (short side = 256, long side = int(256 * long / short)) and calls
PIL's resize with BILINEAR (anti-aliased); CenterCrop(224) uses int(round((size - 224) / 2.0)) offsets;
ToTensor divides by 255 and moves channels first; Normalize subtracts mean and divides by std.
Images are opened the way torchvision's ImageFolder loader does: Image.open(...).convert("RGB").
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_crop(data: bytes, resize: int = 256, crop: int = 224) -> np.ndarray:
    """RGB uint8 (crop, crop, 3): Resize(resize) + CenterCrop(crop) on the PIL image."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


def reference_tensor(data: bytes, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Float32 (3, crop, crop): the full torchvision evaluation transform."""
    rgb = reference_crop(data, resize, crop).astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return rgb.transpose(2, 0, 1)
