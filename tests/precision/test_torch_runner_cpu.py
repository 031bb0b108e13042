"""The PyTorch runner's weights and GPU-side preprocessing, checked on the CPU in FP32 against ONNX
Runtime on the same bundle (CUDA and FP16 themselves only run on a GPU machine: bench/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
from label_agreement import assert_same_labels_up_to_ties

from worker.pipeline.preprocess import decode_and_crop
from worker.runners.base import RunnerError
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.runners.torch_cuda_runner import TorchCudaRunner
from worker.sidecar import ModelSpec


def test_torch_runner_matches_onnxruntime_on_the_trained_bundle(trained_bundle, photo_dir):
    spec = ModelSpec.load(trained_bundle)
    crops = np.stack(
        [decode_and_crop(p.read_bytes(), spec.preprocessing) for p in sorted(photo_dir.glob("*.jpg"))]
    )
    with OnnxRuntimeRunner(trained_bundle) as runner:
        expected = runner.infer(crops, want_features=True)
    for channels_last in (True, False):
        with TorchCudaRunner(
            trained_bundle, device="cpu", precision="fp32", channels_last=channels_last
        ) as runner:
            got = runner.infer(crops, want_features=True)
        np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4)
        np.testing.assert_allclose(got.features, expected.features, rtol=1e-3, atol=1e-3)
        assert got.probabilities.dtype == np.float32


def test_torch_runner_refuses_a_cuda_device_it_cannot_see(trained_bundle):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RunnerError, match="no CUDA device"):
        TorchCudaRunner(trained_bundle).load()


def test_torch_runner_needs_a_pytorch_built_bundle(tmp_path, trained_bundle):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(trained_bundle, bundle)
    spec = ModelSpec.load(bundle)
    imported = ModelSpec.from_dict({**spec.to_dict(), "source": {"kind": "onnx"}})
    with pytest.raises(RunnerError, match="built from PyTorch weights"):
        TorchCudaRunner(bundle, imported, device="cpu", precision="fp32").load()


def test_torch_runner_serves_the_labeling_service_with_the_same_labels(trained_bundle, photo_dir):
    """Same labels up to near-ties (label_agreement.py): on these photos the best two classes are at
    least 0.046 apart and the backends differ by under 1e-5, so in practice every label is equal."""
    from worker.pipeline.service import LabelingService, ServiceOptions

    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    classes = ModelSpec.load(trained_bundle).classes
    scores = {}
    for name, runner in (
        ("onnxruntime", OnnxRuntimeRunner(trained_bundle, intra_op_threads=1)),
        ("torch", TorchCudaRunner(trained_bundle, device="cpu", precision="fp32")),
    ):
        records: list[dict] = []
        with LabelingService(runner, ServiceOptions(max_batch_size=8, decode_threads=2)) as service:
            for path in paths:
                service.submit(path, records.append)
            service.drain()
        by_path = {r["path"]: r["labels"] for r in records}
        assert sorted(by_path) == paths
        scores[name] = np.zeros((len(paths), len(classes)))
        for row, path in enumerate(paths):  # top-5 of 4 classes: every score is in the record
            for entry in by_path[path]:
                scores[name][row, entry["index"]] = entry["score"]
    assert_same_labels_up_to_ties(scores["onnxruntime"], scores["torch"].argmax(1), tie=1e-4)


def test_torch_runner_submit_pipelines_slots_and_refuses_an_uncollected_one(trained_bundle, photo_dir):
    """submit()/result() with two slots give the same outputs as infer(); a third batch in flight
    is refused because its copy-out would overwrite outputs nobody has read."""
    spec = ModelSpec.load(trained_bundle)
    crops = np.stack(
        [decode_and_crop(p.read_bytes(), spec.preprocessing) for p in sorted(photo_dir.glob("*.jpg"))]
    )
    runner = TorchCudaRunner(trained_bundle, device="cpu", precision="fp32", max_batch=8, slots=2)
    with runner:
        assert runner.pipeline_depth == 2
        expected = runner.infer(crops[:8], want_features=True)
        first = runner.submit(crops[:5], want_features=True)
        second = runner.submit(crops[5:8])
        with pytest.raises(RunnerError, match="uncollected"):
            runner.submit(crops[8:])
        got_first, got_second = first.result(), second.result()
    np.testing.assert_allclose(got_first.probabilities, expected.probabilities[:5], atol=1e-5)
    np.testing.assert_allclose(got_first.features, expected.features[:5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_second.probabilities, expected.probabilities[5:8], atol=1e-5)
    assert got_second.features is None


def test_torch_runner_reads_a_staged_batch_in_place(trained_bundle, photo_dir):
    spec = ModelSpec.load(trained_bundle)
    crops = np.stack(
        [decode_and_crop(p.read_bytes(), spec.preprocessing) for p in sorted(photo_dir.glob("*.jpg"))[:6]]
    )
    with TorchCudaRunner(trained_bundle, device="cpu", precision="fp32", max_batch=8, slots=2) as runner:
        expected = runner.infer(crops)
        staged = runner.staging(len(crops))
        staged[...] = crops
        got = runner.submit(staged).result()
        assert runner.staging(9) is None  # over max_batch
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-5)
