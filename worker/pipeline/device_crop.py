"""One decoded image -> the model's uint8 crop, with torch, on whatever device the image is on.

The GPU decode stage's resize. It cuts the same pixel box as the OpenCV path (CropPlan.pixel_box)
and resizes it once, but with torch's anti-aliased bilinear filter (torchvision's tensor Resize with
antialias=True, made to match PIL): the GPU decoders have no reduced-resolution DCT decode to act as
the prefilter, so the filter itself must anti-alias. The same code runs on CPU tensors in the tests,
which is how its parity with OpenCV and torchvision is checked without a GPU.
"""

from __future__ import annotations

from typing import Any

from worker.pipeline.preprocess import CropPlan


def crop_resize_tensor(image: Any, plan: CropPlan, flip_channels: bool) -> Any:
    """(H, W, 3) uint8 tensor -> (crop_h, crop_w, 3) uint8 tensor on the same device.

    `flip_channels` turns the decoder's RGB into the BGR the sidecar's input asks for (or back)."""
    import torch
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {tuple(image.shape)} {image.dtype}")
    height, width = image.shape[:2]
    left, top, right, bottom = plan.pixel_box(width, height)
    region = image[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0).float()
    size = (plan.crop_height, plan.crop_width)
    resized = F.interpolate(region, size=size, mode="bilinear", align_corners=False, antialias=True)
    crop = resized.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    return crop.flip(2) if flip_channels else crop


__all__ = ["crop_resize_tensor"]
