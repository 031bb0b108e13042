"""`labeler build BUNDLE --precision ...` and `labeler run --backend ...` through the real CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.sidecar import ModelSpec


@pytest.fixture(scope="module")
def cli_bundle(trained_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("cli") / "bundle"
    shutil.copytree(trained_bundle, bundle)
    return bundle


def test_build_adds_a_gated_fp16_variant_to_an_existing_bundle(cli_bundle, calib_dir):
    result = CliRunner().invoke(
        main,
        [
            "build",
            str(cli_bundle),
            "--precision",
            "fp16",
            "--gate-images",
            str(calib_dir),
            "--gate-count",
            "80",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "top-1 agr" in result.output and "PASS" in result.output
    assert ModelSpec.load(cli_bundle).variants["fp16"]["gate"]["images"] == 80


def test_run_uses_the_variant_with_the_chosen_backend(cli_bundle, photo_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["run", str(photo_dir), "--model", str(cli_bundle), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--backend", "onnxruntime", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(list(photo_dir.glob("*.jpg"))) and all("labels" in r for r in records)


def test_run_with_a_forced_backend_that_cannot_run_fails_clearly(
    cli_bundle, photo_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: no GPU
    args = ["run", str(photo_dir), "--model", str(cli_bundle), "--out", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(main, [*args, "--backend", "torch-cuda"])
    assert result.exit_code == 1
    assert "backend torch-cuda: no NVIDIA GPU visible" in result.output


def test_build_usage_errors_say_what_to_do(cli_bundle):
    runner = CliRunner()
    nothing = runner.invoke(main, ["build", str(cli_bundle)])
    assert nothing.exit_code == 2 and "give --precision and/or --tensorrt" in nothing.output
    mixed = runner.invoke(main, ["build", str(cli_bundle), "--weights", "random", "--precision", "fp16"])
    assert mixed.exit_code == 2 and "existing bundle" in mixed.output
    neither = runner.invoke(main, ["build", "--precision", "fp16"])
    assert neither.exit_code == 2 and "--out DIR" in neither.output


def test_build_tensorrt_without_tensorrt_says_where_engines_are_built(cli_bundle):
    result = CliRunner().invoke(main, ["build", str(cli_bundle), "--tensorrt"])
    assert result.exit_code == 1
    assert "tensorrt is not installed" in result.output and "GPU node" in result.output


def test_build_int8_fallback_flags_reach_the_build(cli_bundle, calib_dir):
    """An unreachable gate (top-1 agreement above 1): `none` reports the miss at once; `auto` with
    a budget of one tries exactly one layer in FP32, then reports the miss."""
    base = ["build", str(cli_bundle), "--precision", "int8", "--calib", str(calib_dir)]
    # few crops (the gate's minimum of 50 held out): only whether the flags arrive matters here
    base += ["--calib-count", "32", "--gate-count", "50", "--gate-top1", "1.01"]
    runner = CliRunner()
    none = runner.invoke(main, [*base, "--int8-fallback", "none"])
    assert none.exit_code == 1 and "below the accuracy gate" in none.output
    assert "sensitivity" not in none.output
    auto = runner.invoke(main, [*base, "--int8-fallback-budget", "1"])
    assert auto.exit_code == 1 and "measuring each layer's sensitivity" in auto.output
    assert "1 layer(s) in FP32" in auto.output and "2 layer(s)" not in auto.output
    report = json.loads((cli_bundle / "precision_report.json").read_text())["variants"]["int8"]
    assert report["fallback"]["budget_layers"] == 1 and len(report["fallback"]["fp32_layers"]) == 1
