"""Backend choice (`--backend auto` and forced backends) with a FAKE nvidia-smi on PATH and the
FAKE tensorrt/pycuda modules: no GPU here, so the GPU's identity is what the fake script prints."""

from __future__ import annotations

import importlib.util
import stat

import pytest

import worker.runners as runners
from worker.runners import RunnerError, choose_backend, create_runner
from worker.runners.gpu_info import GpuInfo, visible_gpu
from worker.runners.tensorrt_runner import TensorRTRunner
from worker.sidecar import ModelSpec


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An `nvidia-smi` that prints one H100, first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return script


@pytest.fixture
def no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere


def _engine(bundle, gpu: GpuInfo) -> None:
    from engine_build.tensorrt_engine import EngineSettings, build_engine

    build_engine(bundle, EngineSettings("fp16", opt_batch=8, max_batch=16), gpu=gpu, echo=lambda _m: None)


def test_fake_smi_gpu_identity_and_cuda_visible_devices(fake_nvidia_smi, monkeypatch):
    assert visible_gpu() == GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpu() is None


def test_auto_without_a_gpu_is_onnxruntime(no_gpu, fake_bundle):
    backend, reason = choose_backend(fake_bundle, ModelSpec.load(fake_bundle), "fp16")
    assert (backend, reason) == ("onnxruntime", "no NVIDIA GPU visible")


def test_fake_auto_prefers_a_matching_tensorrt_engine(fake_gpu, fake_nvidia_smi, fake_bundle, monkeypatch):
    monkeypatch.setattr(runners, "installed_tensorrt_version", lambda: "11.4.0")
    _engine(fake_bundle, GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    backend, reason = choose_backend(fake_bundle, ModelSpec.load(fake_bundle), "fp16")
    assert backend == "tensorrt" and "fits NVIDIA H100" in reason
    assert isinstance(create_runner(fake_bundle, "auto", precision="fp16"), TensorRTRunner)
    # an fp32 request has no fp32 engine: not TensorRT
    assert choose_backend(fake_bundle, ModelSpec.load(fake_bundle), "fp32")[0] != "tensorrt"


def test_fake_auto_skips_engines_for_other_gpus(fake_gpu, fake_nvidia_smi, fake_bundle, monkeypatch):
    monkeypatch.setattr(runners, "installed_tensorrt_version", lambda: "11.4.0")
    _engine(fake_bundle, GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    spec = ModelSpec.load(fake_bundle)
    backend, reason = choose_backend(fake_bundle, spec, "fp16")
    assert backend == "onnxruntime" and "needs a bundle built with --weights" in reason
    pytorch_spec = ModelSpec.from_dict({**spec.to_dict(), "source": {"kind": "pytorch"}})
    import torch

    backend, reason = choose_backend(fake_bundle, pytorch_spec, "fp16")
    if torch.version.cuda is None:  # this workplace: CPU-only torch is not a GPU backend
        assert backend == "onnxruntime" and "CPU-only build" in reason
    else:
        assert backend == "torch-cuda"
    assert choose_backend(fake_bundle, pytorch_spec, "int8")[0] == "onnxruntime"


def test_forced_tensorrt_without_the_packages_says_what_to_install(no_gpu, fake_bundle, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorrt", "pycuda") else real_find_spec(name, *a),
    )
    with pytest.raises(
        RunnerError, match=r"needs tensorrt and pycuda: pip install 'resnet-labeler\[tensorrt\]'"
    ):
        create_runner(fake_bundle, "tensorrt", precision="fp16")


def test_forced_torch_cuda_without_a_gpu_fails_clearly(no_gpu, fake_bundle):
    with pytest.raises(RunnerError, match="backend torch-cuda"):
        create_runner(fake_bundle, "torch-cuda", precision="fp16")


def test_unknown_backend_lists_the_choices(fake_bundle):
    with pytest.raises(RunnerError, match="auto, onnxruntime, tensorrt, torch-cuda"):
        create_runner(fake_bundle, "openvino")


def test_fake_trt_labeler_build_tensorrt_passes_the_profile_and_settings(
    fake_gpu, fake_nvidia_smi, fake_bundle
):
    """`labeler build BUNDLE --tensorrt` end to end through click, against the fakes."""
    from click.testing import CliRunner

    from worker.cli import main

    args = ["build", str(fake_bundle), "--tensorrt", "--max-batch", "32", "--opt-batch", "16"]
    result = CliRunner().invoke(main, [*args, "--workspace-mib", "256", "--opt-level", "5"])
    assert result.exit_code == 0, result.output
    assert "engine      model.fp32.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.b32.engine" in result.output
    assert fake_gpu.named("set_shape") == 2 * [
        ("set_shape", "images", (1, 32, 32, 3), (16, 32, 32, 3), (32, 32, 32, 3))
    ]
    assert fake_gpu.named("builder_optimization_level") == [("builder_optimization_level", 5)]
    assert fake_gpu.named("set_memory_pool_limit")[0][2] == 256 << 20
    assert (fake_bundle / "engines" / "model.fp32.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.b32.json").is_file()
