"""End-to-end `labeler run` against the bare runner, and preprocessing against bare cv2.imdecode.

    python bench/bench_local.py [--model BUNDLE] [--images 300] [--batch-size 32]

1. Bare runner: all images preprocessed beforehand (untimed), then only runner.infer over batches.
2. End to end: run_local (read, decode, crop in the thread pool, batch, infer, write JSONL) on the
   same files with the same runner settings. Ratio end-to-end / bare; target >= 0.85 on 2 cores.
3. Preprocessing on one thread: decode_and_crop per file vs bare cv2.imdecode of the same bytes;
   target <= 1.25x. Both are measured in this run, alternating, so machine noise hits both.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bundle_or_default, machine_description, make_photo_set  # noqa: E402

from worker.local.run import run_local  # noqa: E402
from worker.pipeline.preprocess import decode_and_crop  # noqa: E402
from worker.pipeline.service import LabelingService, ServiceOptions  # noqa: E402
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from worker.sidecar import ModelSpec  # noqa: E402


def bare_runner(bundle: Path, crops: np.ndarray, batch: int, repeats: int) -> float:
    best = 0.0
    with OnnxRuntimeRunner(bundle) as runner:
        runner.infer(crops[:batch])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            for i in range(0, len(crops), batch):
                runner.infer(crops[i : i + batch])
            best = max(best, len(crops) / (time.perf_counter() - started))
    return best


def end_to_end(bundle: Path, paths: list[Path], batch: int, out: Path, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        options = ServiceOptions(max_batch_size=batch, max_wait_s=0.02)
        summary = run_local([str(p) for p in paths], LabelingService(OnnxRuntimeRunner(bundle), options), out)
        assert summary.labeled == len(paths), summary.lines()
        best = max(best, len(paths) / summary.seconds)  # model load excluded, as for the bare runner
    return best


def preprocessing(paths: list[Path], spec: ModelSpec, rounds: int) -> tuple[float, float]:
    cv2.setNumThreads(1)
    blobs = [p.read_bytes() for p in paths]
    decode, crop = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for blob in blobs:
            cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        decode.append((time.perf_counter() - started) / len(blobs))
        started = time.perf_counter()
        for blob in blobs:
            decode_and_crop(blob, spec.preprocessing)
        crop.append((time.perf_counter() - started) / len(blobs))
    return statistics.median(decode), statistics.median(crop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="bundle (default: the embedded default ResNet-50)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.model = bundle_or_default(args.model)
    spec = ModelSpec.load(args.model)
    print(f"machine: {machine_description()}")
    print(
        f"model: {args.model} ({spec.source.get('description')}), batch {args.batch_size}, {args.images} images"
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photo_set(Path(tmp) / "photos", args.images)
        sizes = {cv2.imread(str(p)).shape[:2] for p in paths[:6]}
        print(f"images: JPEG q90 cut from scikit-image photos, sizes {sorted(sizes)}")
        decode_ms, crop_ms = preprocessing(paths, spec, rounds=5)
        print(
            f"preprocess (1 thread): bare cv2.imdecode {decode_ms * 1e3:.3f} ms/img, "
            f"decode_and_crop {crop_ms * 1e3:.3f} ms/img, ratio {crop_ms / decode_ms:.2f}x (target <= 1.25)"
        )
        crops = np.stack([decode_and_crop(p.read_bytes(), spec.preprocessing) for p in paths])
        e2e = end_to_end(args.model, paths, args.batch_size, Path(tmp) / "out.jsonl", args.repeats)
        bare = bare_runner(args.model, crops, args.batch_size, args.repeats)
        print(
            f"bare runner: {bare:.1f} img/s; labeler run end to end: {e2e:.1f} img/s; "
            f"ratio {e2e / bare:.3f} (target >= 0.85)"
        )


if __name__ == "__main__":
    main()
