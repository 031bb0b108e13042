"""GPU path check: engine-only, decode-only and end-to-end throughput on the same images.

    python bench/gpu_check.py                 # on a GPU node (PyTorch with CUDA, OpenCV); < 8 min
    python bench/gpu_check.py --smoke         # tiny model on the CPU, < 2 min: the script's own test

1. Engine only: the PyTorch CUDA runner (FP16, channels_last) on uint8 crops already in host memory
   (copy in, preprocess on the GPU, ResNet-50, probabilities back), at batch 64/128/256, fed as the
   service feeds it (submit() with its pipeline depth in flight) and one batch at a time; plus the
   bare model on tensors already on the GPU, for reference against published figures.
2. Decode only, on ImageNet-size (500x375) and 12 MP (4000x3000) JPEGs: `cpu`, read +
   decode_and_crop of every file on a thread pool with all cores (the worker's OpenCV stage); `gpu`,
   the GPU decode stage (nvImageCodec + torch resize) on batches of bytes already read, crops left
   in device memory. Plus the GPU crops' parity with the OpenCV crops (mean and 99th percentile).
3. End to end: LabelingService (decode pool + batcher + one inference thread, records built) over
   the same files with the same runner, once per decode stage and image size.
Ratio: end-to-end / min(engine-only at the end-to-end batch size, that stage's decode-only); target
>= 0.9; and GPU / all-core CPU decode of 12 MP photos, target >= 5. The GPU stage needs nvImageCodec
(`pip install --no-index --find-links WHEELS 'nvidia-nvimgcodec-cu12[nvjpeg]'`, or -cu13 to match
torch.version.cuda); without it those rows say so and the rest runs.
TensorRT is not used (the lent machines have none); its runner is checked with fakes in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import cpu_name  # noqa: E402

from worker.pipeline.decode_stage import CpuDecodeStage  # noqa: E402
from worker.pipeline.preprocess import decode_and_crop  # noqa: E402
from worker.pipeline.service import LabelingService, ServiceOptions  # noqa: E402
from worker.runners.torch_cuda_runner import TorchCudaRunner  # noqa: E402
from worker.sidecar import ModelInput, ModelSpec, Preprocessing  # noqa: E402


def machine(device: str) -> str:
    import torch

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (smoke mode)"
    return (
        f"{gpu}; {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, OpenCV {cv2.__version__}"
    )


def make_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """JPEGs (size and its portrait twin, quality 90) of smooth random scenes with noise, made with
    all cores: ImageNet-sized by default, 4000x3000 for phone photos."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> Path:
        rng = np.random.default_rng(seed + index)
        w, h = size if index % 3 else size[::-1]
        base = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        image = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8))
        path = folder / f"img{index:05d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(one, range(count)))


def random_resnet(classes: int, base_width: int):
    """A seeded random ResNet-50 straight from worker.resnet, for the runner's build_model: used
    when the node cannot export ONNX (no onnx/onnxscript); the speed is the same, the labels mean
    nothing."""

    def build():
        import torch

        from worker.resnet import resnet50

        torch.manual_seed(0)
        return resnet50(classes, base_width).eval()

    return build


def make_runner_factory(work: Path, classes: int, base_width: int, size: int, device: str, precision: str):
    """A bundle built by the real build path if this node can export, else the random module."""
    prep = Preprocessing(crop_size=(size, size), resize_size=int(size * 256 / 224))
    try:
        from engine_build.build import build_from_weights
        from engine_build.weights import random_weights

        bundle = work / "bundle"
        build_from_weights(random_weights(classes, 0, base_width), bundle, prep)
        how = "bundle built by labeler's build path (random weights), weights read back from its ONNX"

        def factory() -> TorchCudaRunner:
            return TorchCudaRunner(bundle, device=device, precision=precision, max_batch=256)

    except Exception as exc:  # noqa: BLE001 - no onnx/onnxscript there, or the export fails: one shot
        bundle = work / "spec-only"
        bundle.mkdir()
        spec = ModelSpec(
            prep, tuple(f"class_{i}" for i in range(classes)), input=ModelInput(height=size, width=size)
        )
        spec.save(bundle)
        how = f"no ONNX export here ({type(exc).__name__}: {str(exc)[:120]}): seeded random ResNet-50 module"

        def factory() -> TorchCudaRunner:
            return TorchCudaRunner(
                bundle,
                spec,
                device=device,
                precision=precision,
                max_batch=256,
                build_model=random_resnet(classes, base_width),
            )

    return factory, how


def engine_only(factory, crops: np.ndarray, batch: int, seconds: float, pipelined: bool = True) -> float:
    """Batches of host uint8 crops through the runner for at least `seconds`. Pipelined: as the
    labeling service feeds it, submit() with pipeline_depth batches in flight (copies overlap
    compute); otherwise one infer() after another."""
    with factory() as runner:
        depth = runner.pipeline_depth if pipelined else 1
        for _ in range(3):  # warm-up: cuDNN autotune, oneDNN primitives for this shape
            runner.infer(crops[:batch])
        in_flight: deque = deque()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 5 * batch:
            for i in range(0, len(crops) - batch + 1, batch):
                if len(in_flight) == depth:
                    in_flight.popleft().result()
                    done += batch
                in_flight.append(runner.submit(crops[i : i + batch]))
        while in_flight:
            in_flight.popleft().result()
            done += batch
        return done / (time.perf_counter() - started)


def model_on_device(factory, batch: int, seconds: float) -> float | None:
    """The bare FP16 model on a tensor already on the GPU (no copies, no preprocessing)."""
    import torch

    if not torch.cuda.is_available():
        return None
    with factory() as runner:
        model = runner._model
        x = torch.randn(batch, 3, *runner.spec.preprocessing.crop_size, device="cuda", dtype=runner._dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                model(x)
                done += batch
            torch.cuda.synchronize()
        return done / (time.perf_counter() - started)


def decode_only(paths: list[Path], prep: Preprocessing, threads: int) -> float:
    def one(path: Path) -> np.ndarray:
        return decode_and_crop(path.read_bytes(), prep)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths[: threads * 4]))  # warm-up
        started = time.perf_counter()
        list(pool.map(one, paths))
        return len(paths) / (time.perf_counter() - started)


def gpu_stage_problem() -> str | None:
    """Why the GPU decode stage cannot be measured here (None: it can)."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError as exc:
        return f"nvImageCodec not importable ({exc})"
    return None


def make_stage(spec: ModelSpec, device: str, options: str | None = None):
    from worker.pipeline.gpu_decode import DEFAULT_OPTIONS, GpuDecodeStage

    return GpuDecodeStage(spec, device=device, options=DEFAULT_OPTIONS if options is None else options)


def gpu_decode_only(
    paths: list[Path], spec: ModelSpec, device: str, batch: int, threads: int, options: str | None = None
) -> dict:
    """The GPU stage on batches of bytes already read and checked (crops left on the device), and
    its crops' parity with OpenCV's on the first batch."""
    import torch

    stage = make_stage(spec, device, options)
    stage.load()
    prep = spec.preprocessing
    with ThreadPoolExecutor(threads) as pool:
        inputs = list(pool.map(lambda p: stage.prepare(p.read_bytes(), prep, 1 << 40), paths))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stage.assemble(inputs[:batch])  # warm-up: decoder state, kernels
    sync()
    failed, started = 0, time.perf_counter()
    for i in range(0, len(inputs), batch):
        failed += len(stage.assemble(inputs[i : i + batch]).failed)
    sync()
    rate = len(inputs) / (time.perf_counter() - started)
    first = stage.assemble(inputs[:batch]).batch.cpu().numpy().astype(np.float32)
    cpu = np.stack([decode_and_crop(p.read_bytes(), prep) for p in paths[:batch]]).astype(np.float32)
    diff = np.abs(first - cpu)
    per_image = diff.reshape(len(diff), -1)
    stage.close()
    return {
        "images_per_s": rate,
        "failed_to_cpu": failed,
        "parity_mean": float(per_image.mean(1).max()),  # worst image's mean |difference|
        "parity_p99": float(np.percentile(per_image, 99, axis=1).max()),
    }


def end_to_end(factory, paths: list[Path], batch: int, threads: int, stage=None) -> tuple[float, float]:
    """Images/s through the LabelingService, and the mean batch size it formed."""
    records: list[dict] = []
    options = ServiceOptions(max_batch_size=batch, max_wait_s=0.005, decode_threads=threads)
    with LabelingService(factory(), options, stage or CpuDecodeStage()) as service:
        started = time.perf_counter()
        for path in paths:
            service.submit(str(path), records.append)
        service.drain()
        elapsed = time.perf_counter() - started
        mean_batch = service.batch_stats.mean
    bad = [r for r in records if "error" in r]
    if len(records) != len(paths) or bad:
        raise SystemExit(f"end-to-end produced {len(records)} records, {len(bad)} errors: {bad[:2]}")
    return len(paths) / elapsed, mean_batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny model on the CPU (checks the script).")
    parser.add_argument("--images", type=int, help="ImageNet-size JPEGs [12000; smoke 64].")
    parser.add_argument("--large-images", type=int, help="12 MP JPEGs [1500; smoke 8 of 800x600].")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Decode threads [all cores].")
    parser.add_argument("--seconds", type=float, help="Time per engine measurement [4; smoke 1].")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    import torch

    if args.smoke:
        device, precision, classes, width, size, batches = "cpu", "fp32", 10, 8, 64, (8, 16, 32)
        count, seconds = args.images or 64, args.seconds or 1.0
        large_count, large_size = args.large_images or 8, (800, 600)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on a CPU machine")
        torch.backends.cudnn.benchmark = True
        device, precision, classes, width, size, batches = "cuda", "fp16", 1000, 64, 224, (64, 128, 256)
        count, seconds = args.images or 12000, args.seconds or 4.0
        large_count, large_size = args.large_images or 1500, (4000, 3000)
    print(f"machine: {machine(device)}", flush=True)
    started = time.perf_counter()
    no_gpu_stage = gpu_stage_problem()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        factory, how = make_runner_factory(work, classes, width, size, device, precision)
        print(f"model:   ResNet-50 base width {width}, {classes} classes, {size}x{size}, {precision}; {how}")
        sets = {
            "imagenet": make_images(work / "imagenet", count),
            "12mp": make_images(work / "large", large_count, seed=10**6, size=large_size),
        }
        spec = factory().spec
        prep = spec.preprocessing
        crops = np.stack(
            [decode_and_crop(p.read_bytes(), prep) for p in sets["imagenet"][: max(batches) * 2]]
        )
        figures: dict = {
            "machine": machine(device),
            "model": how,
            "threads": args.threads,
            "images": {name: len(paths) for name, paths in sets.items()},
            "large_size": list(large_size),
            "gpu_stage": no_gpu_stage or "nvImageCodec",
        }
        figures["engine_only"] = {str(b): engine_only(factory, crops, b, seconds) for b in batches}
        figures["engine_sequential"] = {
            str(b): engine_only(factory, crops, b, seconds, pipelined=False) for b in batches
        }
        figures["model_on_device"] = {str(b): model_on_device(factory, b, seconds) for b in batches}
        e2e_batch = max(batches)
        engine = figures["engine_only"][str(e2e_batch)]
        figures["decode"], figures["end_to_end"] = {}, {}
        for name, paths in sets.items():
            for mode in ("cpu", "gpu"):
                key = f"{name}/{mode}"
                if mode == "gpu" and no_gpu_stage:
                    continue
                if mode == "gpu":
                    figures["decode"][key] = gpu_decode_only(paths, spec, device, e2e_batch, args.threads)
                else:
                    figures["decode"][key] = {"images_per_s": decode_only(paths, prep, args.threads)}
                best = (0.0, 0.0)
                for _ in range(2):  # best of two: the first pass also warms the page cache
                    stage = make_stage(spec, device) if mode == "gpu" else None
                    best = max(best, end_to_end(factory, paths, e2e_batch, args.threads, stage))
                decode = figures["decode"][key]["images_per_s"]
                figures["end_to_end"][key] = {
                    "images_per_s": best[0],
                    "mean_batch": best[1],
                    "ratio": best[0] / min(engine, decode),
                }
                print(f"  {key}: decode {decode:.0f}/s, end to end {best[0]:.0f}/s", flush=True)
        if not no_gpu_stage:  # the stage's chroma option off: does it keep a decoder from the images?
            figures["decode_12mp_gpu_default_options"] = gpu_decode_only(
                sets["12mp"], spec, device, e2e_batch, args.threads, options=""
            )
    if "12mp/gpu" in figures["decode"]:
        figures["gpu_over_cpu_decode_12mp"] = (
            figures["decode"]["12mp/gpu"]["images_per_s"] / figures["decode"]["12mp/cpu"]["images_per_s"]
        )
    figures["seconds"] = time.perf_counter() - started
    report(figures, batches, e2e_batch, args.threads)
    if no_gpu_stage:
        print(f"GPU decode stage not measured: {no_gpu_stage}")
    if args.smoke:
        print("smoke mode: engine and decoding share the same CPU cores, so the ratios mean nothing here")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report(figures: dict, batches: tuple[int, ...], e2e_batch: int, threads: int) -> None:
    print(f"{'measure':<40} {'images/s':>10}")
    for b in batches:
        print(
            f"{'engine only, batch ' + str(b) + ' (host uint8 in)':<40} {figures['engine_only'][str(b)]:>10.0f}"
        )
        print(f"{'  one batch at a time (no overlap)':<40} {figures['engine_sequential'][str(b)]:>10.0f}")
        on_device = figures["model_on_device"][str(b)]
        if on_device:
            print(f"{'  model only, tensors on GPU':<40} {on_device:>10.0f}")
    for key, decode in figures["decode"].items():
        e2e = figures["end_to_end"][key]
        extra = ""
        if "parity_mean" in decode:
            extra = (
                f"  parity vs OpenCV: worst mean {decode['parity_mean']:.2f}, p99 {decode['parity_p99']:.0f} "
                f"(<= 5, <= 32); {decode['failed_to_cpu']} fell back"
            )
        label = f"decode {key}" + (f", {threads} threads" if key.endswith("cpu") else ", batches of bytes")
        print(f"{label:<40} {decode['images_per_s']:>10.0f}{extra}")
        print(
            f"{'  end to end, batch ' + str(e2e_batch):<40} {e2e['images_per_s']:>10.0f}  "
            f"(mean batch {e2e['mean_batch']:.0f}; ratio to min(engine, decode) {e2e['ratio']:.2f}, target >= 0.9)"
        )
    plain = figures.get("decode_12mp_gpu_default_options")
    if plain:
        print(
            f"{'  12mp/gpu without :fancy_upsampling=1':<40} {plain['images_per_s']:>10.0f}  parity worst mean {plain['parity_mean']:.2f}, p99 {plain['parity_p99']:.0f}"
        )
    if "gpu_over_cpu_decode_12mp" in figures:
        print(f"GPU / all-core CPU decode, 12 MP: {figures['gpu_over_cpu_decode_12mp']:.1f}x (target >= 5)")
    print(f"{figures['seconds']:.0f} s total")


if __name__ == "__main__":
    main()
