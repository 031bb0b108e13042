"""Does a passed gate predict agreement on photos the build never saw? (issue 20)

    python bench/bench_gate_holdout.py [--tiny-bundle BUNDLE --calib DIR] [--fresh 1000]

On the test suite's trained model (tests/precision/shapes_task.py; trained here as in
bench_int8_gate.py unless given), each INT8 form is built through the real add_precision_variants
with 200 calibration and 200 held-out images, under the default gate and under a strict one that
forces the fallback search (mean score difference 5% below all-INT8's, as the tests set it). The
built model is then run on --fresh new images of the same task (another seed, never seen by the
build) and its agreement with FP32 there is set beside what the build reported: the verdict and
its 95% interval, and the figure the search chose with (what the build reported before issue 20).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "precision"))
from bench_int8_gate import build_tiny_bundle  # noqa: E402
from common import machine_description, machine_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny-bundle", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--fresh", type=int, default=1000)
    args = parser.parse_args()
    import json

    from shapes_task import CROP, write_images

    from engine_build.errors import BuildError
    from engine_build.precision.calibration import load_crops
    from engine_build.precision.evaluate import run_onnx
    from engine_build.precision.fallback import FallbackSettings
    from engine_build.precision.gate import compare, default_thresholds
    from engine_build.precision.variants import PrecisionRequest, add_precision_variants

    print(f"machine: {machine_description()}; {machine_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, calib = (
            (args.tiny_bundle, args.calib) if args.tiny_bundle else build_tiny_bundle(work / "b", work)
        )
        fresh_paths = [str(p) for p, _ in write_images(work / "fresh", args.fresh, seed=11)]
        fresh = load_crops(fresh_paths, CROP).crops
        reference = run_onnx(source / "model.onnx", "images", fresh)
        print(
            "| form | gate | FP32 layers | build reported (images) | 95% interval | search chose with | fresh photos | inside |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for precision in ("int8", "cpu-int8"):
            limits = default_thresholds(precision)
            bundle = work / f"{precision}-none"
            shutil.copytree(source, bundle)
            request = PrecisionRequest((precision,), calib, 200, heldout_count=200)
            none = PrecisionRequest(
                (precision,), calib, 200, heldout_count=200, fallback=FallbackSettings("none")
            )
            _spec, (plain,) = add_precision_variants(bundle, none, echo=lambda _m: None)
            gates = {
                "default": {},
                "strict mean diff": {"max_mean_score_diff": 0.95 * plain.mean_score_diff},
            }
            for name, overrides in gates.items():
                bundle = work / f"{precision}-{name.replace(' ', '-')}"
                shutil.copytree(source, bundle)
                try:
                    strict = replace(request, threshold_overrides=overrides)
                    _spec, (result,) = add_precision_variants(bundle, strict, echo=lambda _m: None)
                except BuildError:
                    result = None
                report = json.loads((bundle / "precision_report.json").read_text())["variants"][precision]
                fallback = report.get("fallback", {})
                chose = fallback.get("search_gate")
                chose_text = (
                    f"{chose['top1_agreement']:.3f} / {chose['mean_score_diff']:.4f}" if chose else "-"
                )
                low, high = report["interval95"]["top1_agreement"]
                d_low, d_high = report["interval95"]["mean_score_diff"]
                verdict = "PASS" if report["passed"] else "FAIL"
                if result is None:
                    print(f"| {precision} | {name} | - | {report['top1_agreement']:.3f} / {report['mean_score_diff']:.4f} "
                          f"({report['images']}) {verdict} | - | {chose_text} | not built | - |")  # fmt: skip
                    continue
                model = bundle / f"model.{precision}.onnx"
                seen = compare(reference, run_onnx(model, "images", fresh), precision, limits)
                inside = low <= seen.top1_agreement <= high and d_low <= seen.mean_score_diff <= d_high
                print(f"| {precision} | {name} | {len(fallback.get('fp32_layers', []))} | "
                      f"{report['top1_agreement']:.3f} / {report['mean_score_diff']:.4f} ({report['images']}) {verdict} | "
                      f"{low:.3f}-{high:.3f} / {d_low:.4f}-{d_high:.4f} | {chose_text} | "
                      f"{seen.top1_agreement:.3f} / {seen.mean_score_diff:.4f} | {'yes' if inside else 'NO'} |")  # fmt: skip
    print(f"after: {machine_load()}")


if __name__ == "__main__":
    main()
