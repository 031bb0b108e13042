"""Our TensorRT builder and runner, and the fake they are tested with, against the REAL TensorRT 11
bindings' names (tensorrt-cu12-bindings of the pinned version, downloaded from the package registry).

What this proves: every TensorRT class, method, property and enum member that
engine_build/tensorrt_engine.py, worker/runners/tensorrt_loader.py and tensorrt_runner.py use exists in the real
module, and the fake (tests/tensorrt_fake) offers no name the real module lacks, so a test that
passes against the fake cannot be using an API TensorRT 11 removed. What it cannot prove: that a
method sits on the class we call it on, its argument types, or anything TensorRT does at run time.
"""

from __future__ import annotations

import re
import sys

import pytest
from pinned_downloads import ROOT, missing, pinned_version
from real_bindings import RealBindings, download_wheel

sys.path.insert(0, str(ROOT / "tests" / "tensorrt_fake"))
from fake_gpu_modules import FakeGpuWorld, fake_trt_names, make_fake_modules  # noqa: E402

SOURCES = (
    ROOT / "engine_build" / "tensorrt_engine.py",
    ROOT / "worker" / "runners" / "tensorrt_loader.py",
    ROOT / "worker" / "runners" / "tensorrt_runner.py",
)

# What the builder and the runner touch, by the TensorRT class that owns it.
USED = {
    "tensorrt": [
        "Logger",
        "Builder",
        "OnnxParser",
        "Runtime",
        "MemoryPoolType",
        "TensorIOMode",
        "nptype",
        "__version__",
    ],
    "ILogger": ["WARNING"],
    "Builder": [
        "create_network",
        "create_builder_config",
        "create_optimization_profile",
        "build_serialized_network",
    ],
    "OnnxParser": ["parse_from_file", "num_errors", "get_error"],
    "IBuilderConfig": [
        "set_memory_pool_limit",
        "builder_optimization_level",
        "add_optimization_profile",
        "create_timing_cache",
        "set_timing_cache",
        "get_timing_cache",
    ],
    "MemoryPoolType": ["WORKSPACE"],
    "IOptimizationProfile": ["set_shape"],
    "ITimingCache": ["serialize"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": [
        "num_io_tensors",
        "get_tensor_name",
        "get_tensor_mode",
        "get_tensor_dtype",
        "get_tensor_shape",
        "get_tensor_profile_shape",
        "num_optimization_profiles",
        "create_execution_context",
    ],
    "TensorIOMode": ["INPUT", "OUTPUT"],
    "IExecutionContext": [
        "set_optimization_profile_async",
        "set_tensor_address",
        "set_input_shape",
        "execute_async_v3",
    ],
}

# TensorRT 10 names that TensorRT 11 removed (FIELD-NOTES): a test must never get them from the fake.
REMOVED = [
    "int8_calibrator",
    "platform_has_fast_fp16",
    "platform_has_fast_int8",
    "device_memory_size",
    "FP16",
]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> RealBindings:
    version = pinned_version("tensorrt")
    bindings = RealBindings.from_wheel(download_wheel(tmp_path_factory.mktemp("trt_wheel"), version))
    assert bindings.version == version and len(bindings.strings) > 10_000
    return bindings


def test_every_name_our_builder_and_runner_use_is_in_real_tensorrt(real):
    absent = missing(USED, lambda _owner, name: real.has(name))
    absent += [owner for owner in USED if owner != "tensorrt" and not real.has(owner)]
    assert not absent, f"not in TensorRT {real.version}: {absent}"


def test_the_used_list_matches_our_code():
    """Every listed name is really used (so the list cannot go stale), and nothing our code reads
    off the variables it keeps TensorRT objects in (trt, builder, config, engine, context, ...) is
    missing from it."""
    text = "\n".join(path.read_text() for path in SOURCES)
    listed = {name for names in USED.values() for name in names}
    unused = sorted(name for name in listed if not re.search(rf"\b{name}\b", text))
    assert not unused, f"listed but not used in {[p.name for p in SOURCES]}: {unused}"
    receivers = r"(?:trt|builder|network|parser|config|profile|timing_cache|engine|context|self\._engine|slot\.context|self\._runtime|self\.runtime|trt\.Logger|trt\.MemoryPoolType|trt\.TensorIOMode)"
    touched = set(re.findall(rf"\b{receivers}\.([A-Za-z_][A-Za-z0-9_]*)", text))
    assert touched <= listed | set(USED), f"TensorRT names used but not listed: {sorted(touched - listed)}"


def test_the_fake_offers_only_names_real_tensorrt_has(real):
    names = fake_trt_names(make_fake_modules(FakeGpuWorld())["tensorrt"])
    assert {"IBuilderConfig", "ICudaEngine", "IExecutionContext"} <= set(names)
    absent = missing(names, lambda _owner, name: real.has(name))
    absent += [owner for owner in names if owner != "tensorrt" and not real.has(owner)]
    assert not absent, f"the fake offers what TensorRT {real.version} lacks: {absent}"


def test_the_fake_refuses_what_tensorrt_11_removed(real):
    assert not [name for name in REMOVED if real.has(name)]  # really gone from the real module
    trt = make_fake_modules(FakeGpuWorld())["tensorrt"]
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder.create_builder_config()
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"FAKE-ENGINE")
    with pytest.raises(AttributeError):
        config.int8_calibrator = object()
    with pytest.raises(AttributeError):
        _ = builder.platform_has_fast_fp16
    with pytest.raises(AttributeError):
        _ = engine.device_memory_size
    with pytest.raises(AttributeError):
        _ = trt.BuilderFlag.FP16
    config.builder_optimization_level = 3  # a declared property is still accepted
