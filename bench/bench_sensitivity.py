"""Does ranking layer sensitivity on fewer calibration crops rank the same layers first? (issue 20)

    python bench/bench_sensitivity.py [--tiny-bundle BUNDLE --calib DIR]

On the test suite's trained model (tests/precision/shapes_task.py, trained here as in
bench_int8_gate.py unless --tiny-bundle is given), for each INT8 form: quantize from 200
calibration crops, rank every INT8 layer by the damage it does alone in INT8 on 128, 64 or 32
crops, or on 32 and then the 16 most harmful again on 128 (fallback.rank_coarse_to_fine, the
default), and compare each ranking with the one on 128: how many of its first k layers are the
reference's first k, the rank correlation, and the seconds taken. Then the fallback search runs with each ranking against the same strict gate (mean score
difference 5% below all-INT8's, as tests/precision/test_int8_fallback.py sets it), so "ranks the same
layers first" is judged by what the build would keep in FP32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_int8_gate import build_tiny_bundle  # noqa: E402
from common import machine_description, machine_load  # noqa: E402


def spearman(order_a: list[str], order_b: list[str]) -> float:
    rank_b = {name: i for i, name in enumerate(order_b)}
    a = np.arange(len(order_a), dtype=np.float64)
    b = np.array([rank_b[name] for name in order_a], dtype=np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny-bundle", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--precisions", nargs="+", default=["int8", "cpu-int8"])
    args = parser.parse_args()
    import onnx

    from engine_build.precision.calibration import CropSet, image_paths, load_crops, split_images
    from engine_build.precision.cpu_int8 import quantize_cpu_int8
    from engine_build.precision.evaluate import run_onnx
    from engine_build.precision.fallback import FallbackSettings, rank_coarse_to_fine, search_fallback
    from engine_build.precision.gate import compare, default_thresholds, margin_failures
    from engine_build.precision.graph_parts import prepared_copy
    from engine_build.precision.int8 import quantize_int8
    from engine_build.precision.variants import split_heldout
    from worker.sidecar import ModelSpec

    print(f"machine: {machine_description()}; {machine_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, calib = (
            (args.tiny_bundle, args.calib) if args.tiny_bundle else build_tiny_bundle(work / "b", work)
        )
        spec = ModelSpec.load(bundle)
        calib_paths, held_paths = split_images(image_paths(calib), 200, 200)
        calibration: CropSet = load_crops(calib_paths, spec.preprocessing)
        heldout = load_crops(held_paths, spec.preprocessing)
        fp32_path = bundle / spec.model_file
        fp32 = prepared_copy(str(fp32_path))
        name = spec.input.name
        reference = run_onnx(fp32_path, name, heldout.crops)
        search, verdict = split_heldout(len(heldout))
        for precision in args.precisions:
            out = work / f"{precision}.onnx"
            if precision == "cpu-int8":
                quantize_cpu_int8(fp32_path, out, calibration.crops, name)
            else:
                quantize_int8(fp32_path, out, calibration.crops, name)
            qdq = onnx.load(str(out))
            limits = default_thresholds(precision)
            all_int8 = compare(reference, run_onnx(qdq, name, heldout.crops), precision, limits)
            strict = replace(limits, max_mean_score_diff=0.95 * all_int8.mean_score_diff, min_images=1)
            print(f"\n{precision}: all-INT8 top-1 {all_int8.top1_agreement:.3f}, mean diff "
                  f"{all_int8.mean_score_diff:.4f}; strict gate mean diff <= {strict.max_mean_score_diff:.4f}")  # fmt: skip
            rows = {
                "128": FallbackSettings(sensitivity_images=128, coarse_images=128),
                "64": FallbackSettings(sensitivity_images=64, coarse_images=64),
                "32": FallbackSettings(sensitivity_images=32, coarse_images=32),
                "32, then 16 on 128": FallbackSettings(),
            }
            rankings, seconds = {}, {}
            for row, settings in rows.items():
                started = time.perf_counter()
                rankings[row] = rank_coarse_to_fine(qdq, fp32, name, calibration.crops, limits, settings)
                seconds[row] = time.perf_counter() - started
            order = [s.layer for s in rankings["128"]]
            print(f"| {precision}: crops | seconds | first 1 / 2 / 4 / 8 as with 128 | rank corr. | FP32 layers kept | verdict top-1 / mean diff |")  # fmt: skip
            for count in rows:
                mine = [s.layer for s in rankings[count]]
                same = " / ".join(str(len(set(mine[:k]) & set(order[:k]))) for k in (1, 2, 4, 8))

                def gate(model, limits=strict, precision=precision):  # as variants.py: with the margin
                    found = compare(
                        reference[search], run_onnx(model, name, heldout.crops[search]), precision, limits
                    )
                    found.failures += margin_failures(found, limits)
                    return found

                found = search_fallback(qdq, fp32, name, calibration.crops, gate, strict, FallbackSettings(),
                                        echo=lambda _m: None, ranking=rankings[count])  # fmt: skip
                if found.model is not None and found.passed:
                    judged = compare(reference[verdict], run_onnx(found.model, name, heldout.crops[verdict]),
                                     precision, strict)  # fmt: skip
                    verdict_word = "PASS" if judged.passed else "FAIL"
                    result = f"{judged.top1_agreement:.3f} / {judged.mean_score_diff:.4f} {verdict_word}"
                else:
                    result = "search found none"
                print(f"| {count} | {seconds[count]:.1f} | {same} | {spearman(mine, order):.2f} | "
                      f"{len(found.layers)} | {result} |")  # fmt: skip
    print(f"after: {machine_load()}")


if __name__ == "__main__":
    main()
