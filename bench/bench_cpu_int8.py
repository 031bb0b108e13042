"""`labeler run --precision int8` against `--precision fp32` on the CPU, full ResNet-50 (issue 20).

    python bench/bench_cpu_int8.py [--model BUNDLE] [--images 320] [--rounds 3] [--batch 32]

1. Build: `labeler build BUNDLE --precision cpu-int8 --calib PHOTOS` through the real CLI, once with
   7-bit weights (--reduce-range, the default) and once without, into two copies of the bundle;
   the gate is opened, since the default bundle here has random weights (speed only; agreement is
   the gate's job, shown on trained models in tests/precision and bench/bench_int8_gate.py).
2. Bare runner: OnnxRuntimeRunner.infer on the same crops for fp32, int8 (the CPU model it picks),
   the TensorRT-shaped int8 and cpu-int8 without reduce_range; alternating rounds, best of each.
3. End to end: `labeler run PHOTOS --precision fp32|int8` as subprocesses (decode, crop, batch,
   infer, write JSONL), alternating: the wall clock (process start and model load included) and the
   labeling rate the command's own summary prints.
Each ratio is against fp32 of the same round (the order turns around every round), and the median
of the rounds is reported with each round's: other jobs on the machine come and go.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import bundle_or_default, machine_description, machine_load, make_photo_set  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPEN_GATE = ["--gate-top1", "0", "--gate-top5", "0", "--gate-mean-diff", "1", "--gate-min-images", "1"]


def labeler(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True)


def build_variant(bundle: Path, calib: Path, reduce_range: bool) -> float:
    """Add cpu-int8 (and the TensorRT-shaped int8, to time it too) through the CLI; seconds taken."""
    flag = "--reduce-range" if reduce_range else "--no-reduce-range"
    started = time.perf_counter()
    done = labeler("build", str(bundle), "--precision", "int8", "--precision", "cpu-int8", flag,
                   "--calib", str(calib), "--calib-count", "64", "--gate-count", "32", *OPEN_GATE)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"build failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def bare(
    bundles: dict[str, tuple[Path, str]], crops: np.ndarray, batch: int, rounds: int
) -> dict[str, list[float]]:
    """images/s of each runner per round; the order turns around every round, so a drift in the
    machine's load hits every variant alike."""
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    runners = {name: OnnxRuntimeRunner(b, precision=p).load() for name, (b, p) in bundles.items()}
    for runner in runners.values():
        runner.infer(crops[:batch])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        for name in list(runners)[:: 1 if index % 2 == 0 else -1]:
            started = time.perf_counter()
            for i in range(0, len(crops), batch):
                runners[name].infer(crops[i : i + batch])
            rates[name].append(len(crops) / (time.perf_counter() - started))
    return rates


SUMMARY = re.compile(r"([0-9.]+) s, ([0-9.]+) images/s")


def end_to_end(
    bundle: Path, photos: Path, count: int, out: Path, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Per precision and round: the command's wall-clock images/s (process start and model load in)
    and the labeling rate its own summary prints (from the loaded model to the last record)."""
    rates: dict[str, dict[str, list[float]]] = {p: {"wall": [], "labeling": []} for p in ("fp32", "int8")}
    for index in range(rounds):
        for precision in ("fp32", "int8")[:: 1 if index % 2 == 0 else -1]:
            target = out / f"{precision}.jsonl"
            target.unlink(missing_ok=True)
            started = time.perf_counter()
            done = labeler("run", str(photos), "--model", str(bundle), "--out", str(target),
                           "--precision", precision, "--backend", "onnxruntime", "--no-progress")  # fmt: skip
            elapsed = time.perf_counter() - started
            if done.returncode:
                raise SystemExit(f"labeler run failed:\n{done.stderr}")
            rates[precision]["wall"].append(count / elapsed)
            rates[precision]["labeling"].append(float(SUMMARY.search(done.stderr).group(2)))
    return rates


def ratios(rates: list[float], baseline: list[float]) -> str:
    """Median of the per-round ratios (each against fp32 of the same round), and their range."""
    each = [a / b for a, b in zip(rates, baseline, strict=True)]
    return f"x{statistics.median(each):.2f} (rounds {', '.join(f'{r:.2f}' for r in each)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="A bundle (default: the embedded default ResNet-50).")
    parser.add_argument("--images", type=int, default=320, help="Photos labeled per end-to-end run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {machine_description()}; {machine_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = bundle_or_default(args.model)
        bundle, wide = work / "bundle", work / "bundle-8bit"
        for copy in (bundle, wide):
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.trt", "*.engine"))
        make_photo_set(work / "calib", 96, seed=1)
        photos = make_photo_set(work / "photos", args.images, seed=2)
        seconds = {
            flag: build_variant(b, work / "calib", flag) for flag, b in ((True, bundle), (False, wide))
        }
        print(f"build of int8 + cpu-int8 (64 calibration crops): {seconds[True]:.0f} s (reduce_range), "
              f"{seconds[False]:.0f} s (8-bit)")  # fmt: skip
        from engine_build.precision.calibration import load_crops
        from worker.sidecar import ModelSpec

        crops = load_crops(
            [str(p) for p in photos[: args.batch * 3]], ModelSpec.load(bundle).preprocessing
        ).crops
        variants = {
            "fp32": (bundle, "fp32"),
            "int8 (runs cpu-int8)": (bundle, "int8"),
            "cpu-int8, 8-bit weights": (wide, "cpu-int8"),
        }
        legacy = work / "tensorrt-shaped"
        shutil.copytree(bundle, legacy)
        spec = ModelSpec.load(legacy)
        del spec.variants["cpu-int8"]  # what a bundle built before cpu-int8 runs for int8
        spec.save(legacy)
        variants["int8, TensorRT-shaped (older bundle)"] = (legacy, "int8")
        rates = bare(variants, crops, args.batch, args.rounds)
        print(
            f"bare runner, batch {args.batch}, {len(crops)} crops, {args.rounds} rounds (median images/s, ratio to fp32):"
        )
        for name, values in rates.items():
            print(f"  {name:<38} {statistics.median(values):7.1f} images/s  {ratios(values, rates['fp32'])}")
        runs = end_to_end(bundle, work / "photos", args.images, work, args.rounds)
        print(f"labeler run, {args.images} photos, {args.rounds} rounds (median images/s, ratio to fp32):")
        for name, kinds in runs.items():
            for kind, values in kinds.items():
                print(f"  --precision {name:<5} {kind:<9} {statistics.median(values):7.1f} images/s  "
                      f"{ratios(values, runs['fp32'][kind])}")  # fmt: skip
        print(f"after: {machine_load()}")


if __name__ == "__main__":
    main()
