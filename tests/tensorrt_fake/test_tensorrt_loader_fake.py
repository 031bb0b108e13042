"""worker.runners.tensorrt_loader, each loader alone, against FAKE tensorrt and pycuda modules.

The runner tests (test_tensorrt_runner_fake.py) check the loaders composed as the runner composes
them; these check what each one promises by itself: the CUDA context on the device asked for and
never left current when it fails, the bundle's engine bytes chosen for this GPU and verified, the
engine deserialized from bytes or from a loader of them, the engine's tensors read and checked
against the bundle, and a runner handed a loader of its own."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from engine_build.tensorrt_engine import EngineSettings, build_engine
from worker.runners.base import RunnerError
from worker.runners.gpu_info import GpuInfo
from worker.runners.tensorrt_loader import (
    BundleEngineBytes,
    EngineFromBytes,
    engine_io,
    push_cuda_context,
)
from worker.runners.tensorrt_runner import TensorRTRunner
from worker.sidecar import ModelSpec

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")


def _build(bundle, gpu: GpuInfo = H100) -> dict:
    return build_engine(bundle, EngineSettings("fp16", opt_batch=16, max_batch=32), gpu=gpu, echo=lambda _m: None)


def test_fake_cuda_context_is_made_on_the_device_asked_for_and_names_its_gpu(fake_gpu):
    context = push_cuda_context(device_index=1)
    assert fake_gpu.named("make_context") == [("make_context", 1)]
    assert context.gpu == H100
    assert fake_gpu.named("context_pop") == []  # current until the caller pops it
    context.pop()
    assert fake_gpu.named("context_pop") == [("context_pop",)]


def test_fake_cuda_context_is_popped_when_the_device_cannot_be_described(fake_gpu):
    fake_gpu.capability = None  # compute_capability() returns something unusable
    with pytest.raises(TypeError):
        push_cuda_context()
    assert fake_gpu.named("context_pop") == [("context_pop",)]


def test_fake_bundle_engine_bytes_are_the_verified_engine_for_this_gpu(fake_gpu, fake_bundle):
    record = _build(fake_bundle)
    spec = ModelSpec.load(fake_bundle)
    loader = BundleEngineBytes(fake_bundle, spec, "fp16", H100)
    assert loader.choice is None and str(fake_bundle) in loader.source
    data = loader()
    assert data == (fake_bundle / "engines" / record["engine_file"]).read_bytes()
    assert loader.choice.record["engine_file"] == record["engine_file"] == loader.source
    assert fake_gpu.named("deserialize_cuda_engine") == []  # bytes only: nothing deserialized yet


def test_fake_bundle_engine_bytes_refuse_another_gpu_or_tensorrt_with_the_rebuild_hint(fake_gpu, fake_bundle):
    _build(fake_bundle, gpu=A100)
    spec = ModelSpec.load(fake_bundle)
    with pytest.raises(RunnerError, match="built for NVIDIA A100-SXM4-80GB") as caught:
        BundleEngineBytes(fake_bundle, spec, "fp16", H100)()
    assert f"labeler build {fake_bundle} --tensorrt --precision fp16" in str(caught.value)
    assert BundleEngineBytes(fake_bundle, spec, "fp16", A100)().startswith(b"FAKE-ENGINE")
    with pytest.raises(RunnerError, match="TensorRT 11.4.0"):  # the record's version, not this one
        BundleEngineBytes(fake_bundle, spec, "fp16", A100, trt_version="10.9.0")()


def test_fake_bundle_engine_bytes_refuse_a_tampered_engine(fake_gpu, fake_bundle):
    record = _build(fake_bundle)
    (fake_bundle / "engines" / record["engine_file"]).write_bytes(b"FAKE-ENGINE but edited")
    with pytest.raises(RunnerError, match="checksum"):
        BundleEngineBytes(fake_bundle, ModelSpec.load(fake_bundle), "fp16", H100)()


def test_fake_engine_from_bytes_deserializes_bytes_or_what_a_loader_returns(fake_gpu):
    engine = EngineFromBytes(b"FAKE-ENGINE")()
    assert engine.num_io_tensors == 3
    calls = []

    class Bytes:
        source = "stand-in.engine"

        def __call__(self) -> bytes:
            calls.append("read")
            return b"FAKE-ENGINE from a loader"

    loader = EngineFromBytes(Bytes())
    assert calls == [] and loader.runtime is None  # nothing happens before the call
    assert loader().num_optimization_profiles == fake_gpu.profiles
    assert calls == ["read"] and loader.runtime is not None  # the runtime stays with the loader
    assert fake_gpu.named("deserialize_cuda_engine") == [
        ("deserialize_cuda_engine", len(b"FAKE-ENGINE")),
        ("deserialize_cuda_engine", len(b"FAKE-ENGINE from a loader")),
    ]


def test_fake_engine_from_bytes_names_what_it_could_not_deserialize(fake_gpu, fake_bundle):
    with pytest.raises(RunnerError, match="could not deserialize the serialized engine; rebuild"):
        EngineFromBytes(b"not an engine")()
    record = _build(fake_bundle)
    (fake_bundle / "engines" / record["engine_file"]).write_bytes(b"garbage")
    record_path = fake_bundle / "engines" / record["engine_file"].replace(".engine", ".json")
    record["engine_sha256"] = hashlib.sha256(b"garbage").hexdigest()
    record_path.write_text(json.dumps(record))
    loader = EngineFromBytes(BundleEngineBytes(fake_bundle, ModelSpec.load(fake_bundle), "fp16", H100))
    with pytest.raises(RunnerError, match=f"could not deserialize {record['engine_file']}; rebuild"):
        loader()


def test_fake_engine_io_reads_names_dtypes_and_the_profile_maximum(fake_gpu, fake_bundle):
    fake_gpu.output_dtype = "float16"
    io = engine_io(EngineFromBytes(b"FAKE-ENGINE")(), ModelSpec.load(fake_bundle))
    assert io.inputs == ["images"] and io.outputs == ["probabilities", "features"]
    assert io.max_batch == fake_gpu.max_batch == 64
    assert io.shapes == {"images": (64, 32, 32, 3), "probabilities": (64, 4), "features": (64, 8)}
    assert io.dtypes == {
        "images": np.dtype(np.uint8),
        "probabilities": np.dtype(np.float16),
        "features": np.dtype(np.float16),
    }


def test_fake_engine_io_refuses_an_engine_that_does_not_serve_the_bundle(fake_gpu, fake_bundle):
    spec = ModelSpec.load(fake_bundle)
    engine = EngineFromBytes(b"FAKE-ENGINE")()
    with pytest.raises(RunnerError, match="has no 'logits' output"):
        engine_io(engine, dataclasses.replace(spec, probabilities_output="logits"))
    fake_gpu.input_name = "pixels"
    with pytest.raises(RunnerError, match=r"engine inputs \['pixels'\]; the bundle expects \['images'\]"):
        engine_io(EngineFromBytes(b"FAKE-ENGINE")(), spec)


def test_fake_trt_runner_runs_an_engine_from_a_loader_it_is_handed(fake_gpu, fake_bundle):
    """No engine in the bundle at all: the runner only runs what its loader gives it."""
    runner = TensorRTRunner(fake_bundle, precision="fp16", load_engine=EngineFromBytes(b"FAKE-ENGINE"))
    with runner:
        assert runner.max_batch_size == 64 and runner.choice is None
        out = runner.infer(np.stack([np.full((32, 32, 3), v, np.uint8) for v in (1, 2, 7)]))
    np.testing.assert_array_equal(out.probabilities.argmax(1), [1, 2, 3])
    assert fake_gpu.named("make_context") == [("make_context", 0)]
    assert fake_gpu.named("context_pop") == [("context_pop",)]


def test_fake_trt_runner_by_default_loads_the_bundles_engine_and_says_which(fake_gpu, fake_bundle):
    record = _build(fake_bundle)
    runner = TensorRTRunner(fake_bundle, precision="fp16")
    assert runner.choice is None and runner.max_batch_size == 32  # from the record, before load
    with runner:
        assert runner.choice.record["engine_file"] == record["engine_file"]
        assert runner.max_batch_size == 64  # then from the engine's own profile (the fake's)
    assert fake_gpu.named("deserialize_cuda_engine") == [("deserialize_cuda_engine", len(b"FAKE-ENGINE"))]


def test_fake_trt_runner_pops_the_context_when_its_loader_fails(fake_gpu, fake_bundle):
    runner = TensorRTRunner(fake_bundle, precision="fp16", load_engine=EngineFromBytes(b"broken"))
    with pytest.raises(RunnerError, match="could not deserialize"):
        runner.load()
    assert fake_gpu.named("context_pop") == [("context_pop",)]
    assert fake_gpu.named("mem_alloc") == []
