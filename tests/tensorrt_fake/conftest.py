"""Fixtures for the FAKE TensorRT/pycuda tests: the fakes installed in sys.modules, a small bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_gpu_modules import FakeGpuWorld, make_fake_modules

from worker.sidecar import ModelInput, ModelSpec, Preprocessing, sha256_file


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGpuWorld:
    """Install the recording fakes of tensorrt and pycuda for one test (removed afterwards)."""
    world = FakeGpuWorld()
    for name, module in make_fake_modules(world).items():
        monkeypatch.setitem(sys.modules, name, module)
    return world


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    """A bundle sidecar with stand-in ONNX bytes (the fake parser never reads them) and an FP16
    variant, at the fake engine's 32x32 crop and 4 classes."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"fp32 onnx stand-in")
    (bundle / "model.fp16.onnx").write_bytes(b"fp16 onnx stand-in")
    prep = Preprocessing(crop_size=(32, 32), resize_size=36)
    spec = ModelSpec(
        preprocessing=prep,
        classes=("a", "b", "c", "d"),
        input=ModelInput(height=32, width=32),
        features_output="features",
        feature_size=8,
        checksum_sha256=sha256_file(bundle / "model.onnx"),
        source={"kind": "test"},
        variants={"fp16": {"file": "model.fp16.onnx", "sha256": sha256_file(bundle / "model.fp16.onnx")}},
    )
    spec.save(bundle)
    return bundle
