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


def resize_region(image: Any, plan: CropPlan) -> Any:
    """(H, W, 3) uint8 tensor -> (3, crop_h, crop_w) float32 tensor on the same device, unrounded.

    Per image only what must be per image (the box and the resize, since sizes differ); rounding,
    the channel order and the layout are done once per batch by `to_model_crops`."""
    import torch
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {tuple(image.shape)} {image.dtype}")
    height, width = image.shape[:2]
    left, top, right, bottom = plan.pixel_box(width, height)
    region = image[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0).float()
    size = (plan.crop_height, plan.crop_width)
    return F.interpolate(region, size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def to_model_crops(resized: Any, flip_channels: bool) -> Any:
    """(N, 3, H, W) float -> (N, H, W, 3) uint8, contiguous: the runner's input layout.

    `flip_channels` turns the decoder's RGB into the BGR the sidecar's input asks for."""
    import torch

    crops = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return (crops.flip(3) if flip_channels else crops).contiguous()


__all__ = ["resize_region", "to_model_crops"]
