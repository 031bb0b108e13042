"""Keras `predict` vs the bundle built from the same Keras model, on the same uint8 crops.

Why: a Keras model could be served with Keras itself; this shows what the bundle path (ONNX
Runtime, preprocessing inside the graph) gives instead, and that its labels are Keras' labels.
Both run the same crops from the worker's decode path; the baseline is measured in the same run.

    .venv/bin/python bench/bench_keras.py --input-size 96 --images 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, make_photo_set  # noqa: E402


def best_rate(fn, images: int, rounds: int) -> float:
    """Images per second of the fastest of `rounds` runs (after one warm-up run)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return images / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from engine_build.keras_export import build_from_keras, caffe_normalize, import_keras
    from engine_build.verify import load_crops
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    keras = import_keras()
    print(machine_description())
    print(f"Keras {keras.__version__} (torch backend), input {args.input_size}, {args.images} images")
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        keras.utils.set_random_seed(0)
        size = (args.input_size, args.input_size, 3)
        inputs = keras.Input(size)
        backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=size)
        pooled = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(pooled))
        model.save(str(work_dir / "m.keras"))
        started = time.perf_counter()
        spec = build_from_keras(work_dir / "m.keras", work_dir / "bundle")
        print(f"labeler build --keras: {time.perf_counter() - started:.1f} s (export + verification)")
        crops = load_crops(make_photo_set(work_dir / "photos", args.images), spec.preprocessing)

        def keras_predict() -> np.ndarray:
            return model.predict(caffe_normalize(crops), batch_size=args.batch_size, verbose=0)

        with OnnxRuntimeRunner(work_dir / "bundle", spec) as runner:

            def bundle_predict() -> np.ndarray:
                parts = [
                    runner.infer(crops[i : i + args.batch_size]).probabilities
                    for i in range(0, len(crops), args.batch_size)
                ]
                return np.concatenate(parts)

            agreement = float(np.mean(keras_predict().argmax(1) == bundle_predict().argmax(1)))
            keras_rate = best_rate(keras_predict, len(crops), args.rounds)
            bundle_rate = best_rate(bundle_predict, len(crops), args.rounds)
    print("| path | images/s | ratio |")
    print("|---|---|---|")
    print(f"| Keras predict (torch backend, caffe normalization in NumPy) | {keras_rate:.1f} | x1.00 |")
    print(
        f"| bundle, ONNX Runtime (normalization in the graph) | {bundle_rate:.1f} | x{bundle_rate / keras_rate:.2f} |"
    )
    print(f"top-1 agreement {agreement:.0%}")


if __name__ == "__main__":
    main()
