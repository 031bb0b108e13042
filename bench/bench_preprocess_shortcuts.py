"""What each preprocessing shortcut costs in time, pixels and labels, against torchvision's transform.

    python bench/bench_preprocess_shortcuts.py [--model BUNDLE] [--images 120]

Variants, each on the same JPEGs (ImageNet-sized, every 4th one a 2000x1500 phone-sized photo):
  reference        PIL Resize(256, bilinear, anti-aliased) + CenterCrop(224) (torchvision's transform)
  worker           what the worker does: reduced JPEG decode, crop region first, one INTER_LINEAR resize
                   (INTER_AREA from 2x downscale)
  no-reduced       the same without the reduced-resolution decode
  area-always      crop first, always INTER_AREA
  resize-then-crop full-image INTER_LINEAR resize to 256, then the 224 crop (the naive order)
For each: ms per image on one thread, mean |pixel diff| vs reference (0..255), and, through the
bundle, top-1 agreement and top-5 overlap with the reference's labels. Labels from a random-weights
bundle only show sensitivity; pass --model with a trained bundle for figures that mean accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent / "tests")]
from common import bundle_or_default, machine_description, make_photo_set  # noqa: E402
from reference_transform import reference_crop  # noqa: E402

from worker.pipeline.image_header import read_header  # noqa: E402
from worker.pipeline.preprocess import crop_resize, decode_and_crop, plan_crop  # noqa: E402
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from worker.sidecar import ModelSpec  # noqa: E402


def variants(prep):
    def reference(data: bytes) -> np.ndarray:
        return np.ascontiguousarray(reference_crop(data, prep.resize_size, prep.crop_size[0])[..., ::-1])

    def area_always(data: bytes) -> np.ndarray:
        plan = plan_crop(read_header(data), prep)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        return crop_resize(image, plan, interpolation=cv2.INTER_AREA)

    def resize_then_crop(data: bytes) -> np.ndarray:
        plan = plan_crop(read_header(data), prep, allow_reduced=False)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        resized = cv2.resize(image, (plan.resized_width, plan.resized_height), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(resized[plan.top : plan.top + 224, plan.left : plan.left + 224])

    return {
        "reference": reference,
        "worker": lambda data: decode_and_crop(data, prep),
        "no-reduced": lambda data: decode_and_crop(data, prep, allow_reduced=False),
        "area-always": area_always,
        "resize-then-crop": resize_then_crop,
    }


def timed(fn, blobs, rounds=3):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        out = [fn(b) for b in blobs]
        times.append((time.perf_counter() - started) / len(blobs))
    return np.stack(out), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()
    args.model = bundle_or_default(args.model)
    spec = ModelSpec.load(args.model)
    cv2.setNumThreads(1)
    print(f"machine: {machine_description()}")
    print(
        f"model: {args.model} ({spec.source.get('description')}); labels meaningful: {spec.labels_meaningful}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        blobs = [p.read_bytes() for p in make_photo_set(Path(tmp), args.images, large_every=4)]
    crops = {}
    print(f"{'variant':18s} {'ms/img':>7s} {'mean|d|':>8s} {'top1 agree':>10s} {'top5 overlap':>12s}")
    with OnnxRuntimeRunner(args.model, spec) as runner:
        probs = {}
        for name, fn in variants(spec.preprocessing).items():
            crops[name], seconds = timed(fn, blobs)
            probs[name] = np.concatenate(
                [runner.infer(crops[name][i : i + 16]).probabilities for i in range(0, len(blobs), 16)]
            )
            ref_top5 = np.argsort(-probs["reference"], 1)[:, :5]
            top5 = np.argsort(-probs[name], 1)[:, :5]
            agree = np.mean(top5[:, 0] == ref_top5[:, 0])
            overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, ref_top5, strict=True)])
            diff = np.abs(crops[name].astype(np.float32) - crops["reference"].astype(np.float32)).mean()
            print(f"{name:18s} {seconds * 1e3:7.2f} {diff:8.2f} {agree:10.1%} {overlap:12.1%}")


if __name__ == "__main__":
    main()
