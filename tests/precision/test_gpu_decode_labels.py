"""Labels through the GPU decode stage agree with the OpenCV path on a model that has learned
something (the tiny ResNet trained on generated shapes; a random-weight bundle labels every image
alike, so it could not show a disagreement). The stage runs on nvImageCodec's CPU backend and CPU
tensors, as in tests/test_gpu_decode.py; the model runs in the torch-cuda runner on the CPU.

Measured on the 400 images of calib_dir (48x48 hard-edged shapes, 32x32 crops, where the two
resize filters differ most): accuracy 0.970 through the stage, 0.955 through OpenCV (the model was
trained on OpenCV crops), top-1 agreement 0.97; swapping the channels drops agreement to 0.41. On
AMD EPYC: 0.960, 0.955, 0.965 and 0.29. The margins (6 images of 400 or more) come from the two
resize filters; float kernels move only near-ties, far fewer.
"""

from __future__ import annotations

import numpy as np
import pytest
from shapes_task import CLASSES

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec (the gpu-decode extra) is not installed")

from worker.pipeline.gpu_decode import GpuDecodeStage  # noqa: E402
from worker.pipeline.preprocess import decode_and_crop  # noqa: E402
from worker.runners.torch_cuda_runner import TorchCudaRunner  # noqa: E402
from worker.sidecar import ModelSpec  # noqa: E402


def test_gpu_stage_labels_agree_with_the_opencv_path(trained_bundle, calib_dir):
    spec = ModelSpec.load(trained_bundle)
    prep = spec.preprocessing
    paths = sorted(calib_dir.glob("*.jpg"))
    truth = np.array([CLASSES.index(p.stem.split("_", 2)[2]) for p in paths])
    blobs = [p.read_bytes() for p in paths]
    stage = GpuDecodeStage(spec, device="cpu")
    stage.load()
    assembled = stage.assemble([stage.prepare(data, prep, 1 << 30) for data in blobs])
    assert assembled.failed == []
    cpu_crops = np.stack([decode_and_crop(data, prep) for data in blobs])
    with TorchCudaRunner(trained_bundle, device="cpu", precision="fp32") as runner:
        gpu = runner.submit_device(assembled.batch).result().probabilities.argmax(1)
        cpu = runner.infer(cpu_crops).probabilities.argmax(1)
        swapped = runner.infer(np.ascontiguousarray(cpu_crops[..., ::-1])).probabilities.argmax(1)
    agreement = float((gpu == cpu).mean())
    assert agreement >= 0.95, agreement
    assert float((gpu == truth).mean()) >= float((cpu == truth).mean()) - 0.02
    assert float((swapped == cpu).mean()) < 0.8  # the check can fail: wrong channels disagree
