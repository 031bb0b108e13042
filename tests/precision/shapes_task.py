"""A small image task generated on the fly, so the accuracy gate can be shown on a trained model.

Four classes a small CNN learns in well under a minute of CPU: red horizontal stripes, green
vertical stripes, a blue disc and a yellow checkerboard, with jittered colours, random dark
backgrounds, period, phase, position and noise. Random weights would make FP32/INT8 agreement meaningless (every output is near-uniform or
constant); a trained model has confident, input-dependent outputs that quantization can disturb.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from worker.sidecar import Preprocessing

CLASSES = ("horizontal_stripes", "vertical_stripes", "disc", "checkerboard")
CROP = Preprocessing(crop_size=(32, 32), resize_size=36)  # the test bundle's preprocessing
CALIB_COUNT = 200  # calibration images; the next HELDOUT_COUNT are the gate's held-out set
HELDOUT_COUNT = 200
_HUES = ((60, 60, 230), (60, 210, 60), (230, 90, 40), (40, 220, 230))


def make_image(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """One BGR uint8 image of class `label`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(10, 24)
    phase = rng.uniform(0, period)
    if label == 0:
        mask = ((yy + phase) // (period / 2)) % 2 == 0
    elif label == 1:
        mask = ((xx + phase) // (period / 2)) % 2 == 0
    elif label == 2:
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        radius = rng.uniform(0.15, 0.35) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    else:
        mask = (((yy + phase) // (period / 2)) + ((xx + phase) // (period / 2))) % 2 == 0
    # Each class also has its own foreground hue (BGR), so a small network learns it in a few hundred
    # steps and its held-out predictions are confident, as a real classifier's mostly are.
    fg = np.clip(np.array(_HUES[label]) + rng.normal(0, 25, size=3), 0, 255)
    bg = rng.uniform(0, 90, size=3)
    image = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, seed: int) -> list[tuple[Path, int]]:
    """`count` JPEGs, classes in rotation, written to `folder`; returns (path, label) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        label = index % len(CLASSES)
        path = folder / f"{seed}_{index:04d}_{CLASSES[label]}.jpg"
        cv2.imwrite(str(path), make_image(label, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        items.append((path, label))
    return items


def train_tiny_resnet(crops_nchw: np.ndarray, labels: np.ndarray, base_width: int = 8, steps: int = 150):
    """Train the project's ResNet-50 at 1/`64/base_width` width; returns the state_dict."""
    import torch

    from worker.resnet import resnet50

    torch.manual_seed(0)
    model = resnet50(len(CLASSES), base_width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    x_all = torch.from_numpy(crops_nchw)
    y_all = torch.from_numpy(labels.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x_all), (32,), generator=generator)
        logits = model(x_all[index])
        loss = torch.nn.functional.cross_entropy(logits, y_all[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model.state_dict()
