"""ONNX Runtime CPU speed of a bundle's FP32, FP16 and INT8 models, measured in the same run.

    python bench/precision_speed.py [--width 64] [--batch 16] [--rounds 3]

Builds a ResNet-50 bundle (seeded random weights: only speed is measured here; agreement is the
gate's job, shown on a trained model in tests/precision), adds the FP16 and INT8 variants through
the real `add_precision_variants` path (calibration and held-out crops from photographs), then
times `OnnxRuntimeRunner.infer` on the same crops for each variant, alternating rounds so machine
noise hits all of them. Ratios are against FP32 from the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine_description, make_photo_set  # noqa: E402

from engine_build.build import build_from_weights  # noqa: E402
from engine_build.precision.calibration import CropSet  # noqa: E402
from engine_build.precision.variants import PrecisionRequest, add_precision_variants  # noqa: E402
from engine_build.weights import random_weights  # noqa: E402
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=64, help="ResNet-50 base width (64: the real one).")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = work / "bundle"
        build_from_weights(random_weights(1000, 0, args.width), bundle)
        make_photo_set(work / "photos", 120)
        # Random weights make agreement meaningless, so the gate is opened here (speed only).
        no_gate = {"min_top1_agreement": 0.0, "min_top5_overlap": 0.0, "max_mean_score_diff": 1.0}
        no_gate |= {"max_max_score_diff": None, "min_images": 1}
        request = PrecisionRequest(
            ("fp16", "int8"), work / "photos", 60, heldout_count=60, threshold_overrides=no_gate
        )
        add_precision_variants(bundle, request, echo=lambda _m: None)
        crops = CropSet.load(bundle / "heldout.npz").crops[: args.batch * 2]
        runners = {v: OnnxRuntimeRunner(bundle, precision=v).load() for v in ("fp32", "fp16", "int8")}
        best = dict.fromkeys(runners, 0.0)
        for runner in runners.values():
            runner.infer(crops[: args.batch])  # warm-up
        for _ in range(args.rounds):
            for variant, runner in runners.items():
                started = time.perf_counter()
                for i in range(0, len(crops), args.batch):
                    runner.infer(crops[i : i + args.batch])
                best[variant] = max(best[variant], len(crops) / (time.perf_counter() - started))
    print(f"ResNet-50 base width {args.width}, 224x224, batch {args.batch}, best of {args.rounds}")
    for variant, rate in best.items():
        print(f"{variant:<5} {rate:8.1f} images/s  x{rate / best['fp32']:.2f} vs fp32")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
