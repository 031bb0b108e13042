"""`labeler worker` refuses, at start, a bundle that cannot serve the asked precision.

Otherwise the worker comes up, takes jobs from the queue, and every job fails. The checks run
before Celery starts, so no Redis is needed: the broker URL points at a closed port, and a worker
that got past the check would hang retrying it (the subprocess timeout then fails the test).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def _start_worker(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The worker as operators start it; it must exit on its own, long before the timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELER_")}
    argv = [sys.executable, "-m", "worker", "worker", "--model", str(bundle), "--broker", _closed_port_url()]
    return subprocess.run([*argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_worker_refuses_a_precision_the_bundle_does_not_have(tiny_bundle: Path) -> None:
    result = _start_worker(tiny_bundle, "--precision", "int8")
    assert result.returncode == 1, result.stderr
    assert f"cannot serve {tiny_bundle}" in result.stderr
    assert "bundle has no 'int8' model (has: fp32)" in result.stderr  # what the bundle does have
    assert f"labeler build {tiny_bundle} --precision int8 --calib DIR" in result.stderr


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_worker_refusal_names_how_to_build_or_what_exists(tiny_bundle: Path, precision: str) -> None:
    result = _start_worker(tiny_bundle, "--precision", precision)
    assert result.returncode == 1, result.stderr
    assert f"bundle has no '{precision}' model (has: fp32)" in result.stderr
    if precision == "fp16":
        assert f"labeler build {tiny_bundle} --precision fp16 --calib DIR" in result.stderr
    else:
        assert "precisions that can be built: fp32, fp16, int8" in result.stderr


def test_worker_refuses_a_bundle_whose_model_file_is_gone(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "model.onnx").unlink()
    result = _start_worker(bundle, "--precision", "fp32")
    assert result.returncode == 1, result.stderr
    assert f"model file missing: {bundle / 'model.onnx'}" in result.stderr
    assert "rebuild the bundle" in result.stderr
