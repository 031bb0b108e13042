"""deploy/docker/prepare_engine.py, the GPU image's start step, with a fake GPU and a fake engine
build (no GPU, no TensorRT here): a mounted engine is used as is, otherwise one is built once into
a copy of the read-only bundle in the cache, and later starts reuse it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import stat
from pathlib import Path

from worker.runners.gpu_info import GpuInfo
from worker.sidecar import ModelSpec

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "prepare_engine.py"
GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
TRT = "11.4.0"


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fake_engine(bundle: Path, gpu: GpuInfo = GPU) -> None:
    """What build_engine leaves behind: an engine file and its record (fake bytes, real record)."""
    spec = ModelSpec.load(bundle)
    engines = bundle / "engines"
    engines.mkdir(exist_ok=True)
    (engines / "fp32.engine").write_bytes(b"fake engine")
    record = {
        "engine_file": "fp32.engine",
        "precision": "fp32",
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_version": TRT,
        "onnx_sha256": spec.checksum_sha256,
    }
    (engines / "fp32.json").write_text(json.dumps(record))


def read_only_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "mounted" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    for path in [bundle, *bundle.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return bundle


def test_builds_once_into_the_cache_and_reuses_it_fake_gpu(tiny_bundle, tmp_path) -> None:
    """Fake GPU and fake build (TensorRT cannot run here)."""
    prepare_engine = load_script()
    mounted = read_only_copy(tiny_bundle, tmp_path)
    builds: list[Path] = []
    try:
        served = prepare_engine.prepare(mounted, tmp_path / "cache", "fp32", GPU, TRT, builds.append)
        assert builds == [served] and served.parent == tmp_path / "cache"
        assert (served / "model.json").exists() and not (mounted / "engines").exists()
        write_fake_engine(served)
        again = prepare_engine.prepare(mounted, tmp_path / "cache", "fp32", GPU, TRT, builds.append)
        assert again == served and len(builds) == 1  # the second start finds the built engine
        other_gpu = GpuInfo("NVIDIA L4", "8.9")
        prepare_engine.prepare(mounted, tmp_path / "cache", "fp32", other_gpu, TRT, builds.append)
        assert len(builds) == 2  # an engine for another GPU model is never reused
    finally:
        for path in [mounted, *mounted.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_serves_a_mounted_engine_without_copying_fake_gpu(tiny_bundle, tmp_path) -> None:
    """Fake GPU and fake engine: a bundle mounted with a fitting engine is served in place."""
    prepare_engine = load_script()
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    write_fake_engine(bundle)
    builds: list[Path] = []
    assert prepare_engine.prepare(bundle, tmp_path / "cache", "fp32", GPU, TRT, builds.append) == bundle
    assert builds == [] and not (tmp_path / "cache").exists()


def test_gpu_argument_is_taken_from_the_worker_arguments() -> None:
    prepare_engine = load_script()
    assert prepare_engine.gpu_argument(["--gpu", "3", "--hostname", "x@%h"]) == "3"
    assert prepare_engine.gpu_argument(["--gpu=5"]) == "5"
    assert prepare_engine.gpu_argument(["--hostname", "x"]) is None
