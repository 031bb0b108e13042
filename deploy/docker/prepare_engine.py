"""Print the bundle a GPU worker should serve, building its TensorRT engine first if none fits.

Run by gpu-entrypoint.sh before `labeler worker`. The mounted bundle (LABELER_MODEL, read through worker/settings.py) is read-only:
if it already holds an engine for this GPU model, TensorRT version and precision, it is served as
is. Otherwise the bundle is copied (without its engines) into ENGINE_CACHE_DIR, keyed by the
model's checksum, and the engine is built there once; later starts on the same node (and the
other GPUs of the node, if they are the same model) find it and start in seconds.
Arguments: the worker's own (`--gpu N` picks the GPU to build for). Logs go to stderr.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def log(message: str) -> None:
    print(f"prepare_engine: {message}", file=sys.stderr, flush=True)


def gpu_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--gpu" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--gpu="):
            return arg.split("=", 1)[1]
    return None


def fits(bundle: Path, precision: str, gpu: object, trt_version: str | None) -> bool:
    from worker.runners.base import RunnerError
    from worker.runners.engine_records import choose_engine
    from worker.sidecar import ModelSpec

    try:
        choose_engine(bundle, ModelSpec.load(bundle), precision, gpu, trt_version)  # type: ignore[arg-type]
    except RunnerError:
        return False
    return True


def writable_copy(source: Path, cache_dir: Path) -> Path:
    """A private copy of the bundle, without its engines, named after the model's checksum."""
    from worker.sidecar import ModelSpec

    spec = ModelSpec.load(source)
    target = cache_dir / f"{source.name}-{spec.checksum_sha256[:16]}"
    if not (target / "model.json").exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("engines"), symlinks=False)
        partial.rename(target)
    return target


def prepare(
    source: Path,
    cache_dir: Path,
    precision: str,
    gpu: object,
    trt_version: str | None,
    build: Callable[[Path], None],
) -> Path:
    """The bundle to serve: `source` if it has a fitting engine, else a cached copy with one."""
    if fits(source, precision, gpu, trt_version):
        log(f"serving the engine mounted in {source}")
        return source
    target = writable_copy(source, cache_dir)
    if fits(target, precision, gpu, trt_version):
        log(f"serving the engine built earlier in {target}")
        return target
    log(f"no {precision} engine for this GPU in {source}: building one in {target} (minutes, once)")
    build(target)
    return target


def main(argv: list[str]) -> int:
    gpu_index = gpu_argument(argv)
    if gpu_index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_index
    import tensorrt as trt

    from engine_build.tensorrt_engine import EngineSettings, build_engine
    from worker.runners.gpu_info import visible_gpu
    from worker.settings import Settings

    config = Settings.from_env()
    source = Path(config.model or "/models/bundle")
    cache_dir = Path(os.environ.get("ENGINE_CACHE_DIR", "/var/cache/labeler/engines"))  # image-only knob
    cache_dir.mkdir(parents=True, exist_ok=True)
    precision = config.precision
    gpu = visible_gpu()
    if gpu is None:
        log("no NVIDIA GPU visible; serving the bundle as is (the worker will say what is missing)")
        print(source)
        return 0
    from worker.runners.tensorrt_runner import TensorRTRunner

    batch = config.batch_size or TensorRTRunner.default_batch_size  # the worker's batch, as it will run
    settings = EngineSettings(precision, 1, batch, batch)

    def build(target: Path) -> None:
        build_engine(target, settings, gpu=gpu, echo=log)

    print(prepare(source, cache_dir, precision, gpu, str(trt.__version__), build))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
