"""Choosing the decode stage (`--decode cpu|gpu|auto`, LABELER_DECODE) on a CPU worker, where
neither nvImageCodec nor CUDA may be installed: none of this needs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.pipeline.build import ServiceConfig
from worker.pipeline.decode_choice import create_stage
from worker.pipeline.decode_stage import CpuDecodeStage
from worker.runners.base import RunnerError
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.settings import Settings, SettingsError


def test_a_cpu_worker_imports_the_pipeline_without_torch_or_nvimgcodec():
    code = (
        "import sys, worker.pipeline.build, worker.pipeline.service, worker.pipeline.gpu_decode; "
        "print(sorted(m for m in ('torch', 'nvidia.nvimgcodec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_onnxruntime_runner_gets_the_cpu_stage_or_a_clear_refusal(tiny_bundle):
    runner = OnnxRuntimeRunner(tiny_bundle)
    assert isinstance(create_stage("cpu", runner), CpuDecodeStage)
    assert isinstance(create_stage("auto", runner), CpuDecodeStage)
    with pytest.raises(RunnerError, match="cannot take batches in device memory"):
        create_stage("gpu", runner)


def test_labeler_run_refuses_gpu_decode_without_a_device_batch_runner(tiny_bundle, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(tmp_path),
            "--model",
            str(tiny_bundle),
            "--backend",
            "onnxruntime",
            "--decode",
            "gpu",
            "--out",
            str(tmp_path / "out.jsonl"),
        ],
    )
    assert result.exit_code != 0
    assert "--decode gpu" in result.output and "torch-cuda" in result.output


def test_the_setting_reaches_the_service_config_and_is_checked():
    settings = Settings.from_env({"LABELER_DECODE": "auto"})
    assert ServiceConfig.pick(settings).decode == "auto"
    assert ServiceConfig().decode == Settings().decode == "cpu"
    with pytest.raises(SettingsError, match="LABELER_DECODE"):
        Settings.from_env({"LABELER_DECODE": "nvjpeg"})
