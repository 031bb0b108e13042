"""engine_build.tensorrt_engine against a FAKE tensorrt (recording, no GPU): what our code asks of
TensorRT 11 (no network flags, profile, workspace, optimization level, timing cache) and what it
writes (engine name, record fields)."""

from __future__ import annotations

import json

import pytest

from engine_build.errors import BuildError
from engine_build.tensorrt_engine import EngineSettings, build_engine
from worker.runners.gpu_info import GpuInfo
from worker.sidecar import ModelSpec

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def test_fake_trt_build_sets_profile_workspace_level_and_strong_typing(fake_gpu, fake_bundle):
    settings = EngineSettings(
        "fp16", min_batch=1, opt_batch=32, max_batch=64, workspace_mib=512, optimization_level=4
    )
    record = build_engine(fake_bundle, settings, gpu=H100, echo=lambda _m: None)

    assert fake_gpu.named("create_network") == [("create_network", ())]  # strongly typed: no flags
    assert fake_gpu.named("parse_from_file")[0][1].endswith("model.fp16.onnx")
    # one identical profile per concurrent execution context (the runner's two slots)
    assert fake_gpu.named("set_shape") == 2 * [
        ("set_shape", "images", (1, 32, 32, 3), (32, 32, 32, 3), (64, 32, 32, 3))
    ]
    assert len(fake_gpu.named("add_optimization_profile")) == 2
    (pool_call,) = fake_gpu.named("set_memory_pool_limit")
    assert pool_call[2] == 512 * 1024 * 1024
    assert fake_gpu.named("builder_optimization_level") == [("builder_optimization_level", 4)]
    assert fake_gpu.named("set_timing_cache") == [("set_timing_cache", False)]

    name = record["engine_file"]
    assert name == "model.fp16.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.b64.engine"
    assert (fake_bundle / "engines" / name).read_bytes() == b"FAKE-ENGINE"
    spec = ModelSpec.load(fake_bundle)
    on_disk = json.loads((fake_bundle / "engines" / name.replace(".engine", ".json")).read_text())
    assert on_disk == record
    assert record["gpu_name"] == H100.name and record["compute_capability"] == "9.0"
    assert record["tensorrt_version"] == "11.4.0" and record["precision"] == "fp16"
    assert record["onnx_sha256"] == spec.variants["fp16"]["sha256"]
    assert record["profile"]["max"] == [64, 32, 32, 3] and record["profiles"] == 2


def test_fake_trt_timing_cache_is_persisted_and_reused(fake_gpu, fake_bundle):
    build_engine(
        fake_bundle, EngineSettings("fp32", max_batch=8, opt_batch=4), gpu=H100, echo=lambda _m: None
    )
    build_engine(
        fake_bundle, EngineSettings("fp16", max_batch=8, opt_batch=4), gpu=H100, echo=lambda _m: None
    )
    first, second = fake_gpu.named("create_timing_cache")
    assert first[1] == b""  # nothing stored yet
    assert second[1] == b"+timings"  # the first build's serialized cache, read back from the bundle
    caches = list((fake_bundle / "engines").glob("timing.*.cache"))
    assert [c.name for c in caches] == ["timing.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.cache"]


def test_fake_trt_parser_errors_are_reported(fake_gpu, fake_bundle):
    fake_gpu.parse_ok = False
    with pytest.raises(BuildError, match="cannot parse model.fp16.onnx: fake parser error"):
        build_engine(fake_bundle, EngineSettings("fp16", max_batch=8, opt_batch=4), gpu=H100)
    assert not (fake_bundle / "engines").exists() or not list((fake_bundle / "engines").glob("*.engine"))


def test_fake_trt_failed_build_raises_and_writes_nothing(fake_gpu, fake_bundle):
    fake_gpu.build_ok = False
    with pytest.raises(BuildError, match="failed to build"):
        build_engine(fake_bundle, EngineSettings("fp16", max_batch=8, opt_batch=4), gpu=H100)
    assert not list(fake_bundle.glob("engines/*.engine"))


def test_fake_trt_missing_precision_variant_says_how_to_add_it(fake_gpu, fake_bundle):
    with pytest.raises(BuildError, match="--precision int8"):
        build_engine(fake_bundle, EngineSettings("int8", max_batch=8, opt_batch=4), gpu=H100)


def test_fake_trt_tampered_onnx_is_refused(fake_gpu, fake_bundle):
    (fake_bundle / "model.fp16.onnx").write_bytes(b"something else")
    with pytest.raises(BuildError, match="checksum"):
        build_engine(fake_bundle, EngineSettings("fp16", max_batch=8, opt_batch=4), gpu=H100)


def test_engine_settings_reject_inconsistent_batches():
    with pytest.raises(ValueError):
        EngineSettings(min_batch=4, opt_batch=2, max_batch=8)
