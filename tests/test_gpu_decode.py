"""The GPU decode stage without a GPU: nvImageCodec's CPU-only backend and torch on CPU tensors run
the stage's own code (batching, the crop and resize, fallback to OpenCV, error records), so only
the CUDA streams, DLPack hand-off and the hardware decoder are left to bench/gpu_check.py.

Parity tolerances are those of tests/test_preprocess_parity.py (mean <= 5 grey levels, 99th
percentile <= 32), against the OpenCV path and against torchvision's transform.
"""

from __future__ import annotations

import struct
import threading

import cv2
import numpy as np
import pytest
from reference_transform import reference_crop
from test_preprocess_parity import MAX_MEAN_GREY, MAX_P99_GREY, photo_bytes

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec (the gpu-decode extra) is not installed")
torch = pytest.importorskip("torch")

from worker.pipeline import decode_choice  # noqa: E402
from worker.pipeline.decode_choice import create_stage  # noqa: E402
from worker.pipeline.decode_stage import CpuDecodeStage, Deferred  # noqa: E402
from worker.pipeline.errors import ImageError  # noqa: E402
from worker.pipeline.gpu_decode import DecodeStageError, GpuDecodeStage  # noqa: E402
from worker.pipeline.preprocess import decode_and_crop  # noqa: E402
from worker.pipeline.service import LabelingService, ServiceOptions  # noqa: E402
from worker.runners.base import RunnerError  # noqa: E402
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from worker.runners.torch_cuda_runner import TorchCudaRunner  # noqa: E402
from worker.sidecar import ModelSpec, Preprocessing  # noqa: E402

PREP = Preprocessing()
SPEC = ModelSpec(PREP, ("a", "b"))  # the default input: BGR uint8 224x224, as OpenCV bundles have
# A JPEG header (SOF0, 400x300, three components) and end marker with nothing between: it passes the
# CPU checks, nvImageCodec cannot parse it and OpenCV cannot decode it.
GARBAGE = (
    b"\xff\xd8"
    + b"\xff\xc0"
    + struct.pack(">HBHHB", 17, 8, 300, 400, 3)
    + bytes.fromhex("012200021101031101")
    + b"\xff\xd9"
)


@pytest.fixture(scope="module")
def stage():
    stage = GpuDecodeStage(SPEC, device="cpu")
    stage.load()
    yield stage
    stage.close()


def prepared(stage, blobs):
    return [stage.prepare(data, PREP, 1 << 30) for data in blobs]


@pytest.mark.parametrize("scale", [1, 3], ids=["native", "large"])
def test_crops_match_opencv_and_torchvision_within_the_parity_tolerances(stage, photos, scale):
    blobs = photo_bytes(photos, scale)
    assembled = stage.assemble(prepared(stage, blobs.values()))
    assert assembled.failed == []
    batch = assembled.batch.numpy()
    assert batch.shape == (len(blobs), 224, 224, 3) and batch.dtype == np.uint8
    for row, (name, data) in zip(batch, blobs.items(), strict=True):
        for other, reference in (
            (decode_and_crop(data, PREP), "opencv"),
            (reference_crop(data)[..., ::-1], "torchvision"),
        ):
            diff = np.abs(row.astype(np.float32) - other)
            assert diff.mean() <= MAX_MEAN_GREY, (name, scale, reference, diff.mean())
            assert np.percentile(diff, 99) <= MAX_P99_GREY, (name, scale, reference, np.percentile(diff, 99))


def test_an_exact_slice_is_exactly_the_opencv_crop(stage):
    """320x256 noise: the crop is a plain slice, no resampling, so both paths give the same pixels
    (nvImageCodec's CPU backend decodes like libjpeg-turbo), and the channels come out BGR."""
    noise = np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    crop = stage.assemble(prepared(stage, [data])).batch[0].numpy()
    np.testing.assert_array_equal(crop, decode_and_crop(data, PREP))


def test_only_jpegs_are_deferred_and_the_cpu_checks_stay_in_front(stage, photos):
    rgb = photos["cat"]
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    assert isinstance(stage.prepare(jpeg, PREP, 1 << 30), Deferred)
    host = stage.prepare(png, PREP, 1 << 30)  # other formats: OpenCV on the pool thread
    np.testing.assert_array_equal(host, decode_and_crop(png, PREP))
    with pytest.raises(ImageError, match="truncated"):
        stage.prepare(jpeg[: len(jpeg) // 2], PREP, 1 << 30)
    with pytest.raises(ImageError, match="over the 1000 cap") as info:
        stage.prepare(jpeg, PREP, 1000)
    assert str(info.value.code) == "too_large"


def test_a_mixed_batch_keeps_input_order_and_lists_what_it_could_not_decode(stage, photos):
    good = photo_bytes(photos, 1)
    cat, coffee = good["cat"], good["coffee"]
    inputs = prepared(stage, [cat, GARBAGE, coffee])
    inputs.insert(1, decode_and_crop(good["rocket"], PREP))  # a host crop (an earlier CPU fallback)
    assembled = stage.assemble(inputs)
    assert assembled.failed == [2]
    batch = assembled.batch.numpy()
    assert len(batch) == 3
    np.testing.assert_array_equal(batch[1], inputs[1])
    for row, data in ((batch[0], cat), (batch[2], coffee)):
        assert np.abs(row.astype(np.float32) - decode_and_crop(data, PREP)).mean() <= MAX_MEAN_GREY


def test_chunks_under_a_pixel_budget_give_the_same_batch(photos):
    blobs = list(photo_bytes(photos, 1).values())
    whole = GpuDecodeStage(SPEC, device="cpu")
    small = GpuDecodeStage(SPEC, device="cpu", max_decode_pixels=300_000)  # about one photo per call
    calls = []

    class Counting:
        def __init__(self, real):
            self.real = real

        def decode(self, streams, **kwargs):
            calls.append(len(streams))
            return self.real.decode(streams, **kwargs)

    for s in (whole, small):
        s.load()
        s._decoder = Counting(s._decoder)
    a = whole.assemble(prepared(whole, blobs)).batch
    whole_calls = len(calls)
    b = small.assemble(prepared(small, blobs)).batch
    assert whole_calls == 1 and len(calls) - whole_calls >= 4
    assert torch.equal(a, b)


def test_a_failing_decode_call_sends_every_image_back_without_failing_the_batch(photos):
    stage = GpuDecodeStage(SPEC, device="cpu")
    stage.load()

    class Broken:
        def decode(self, streams, **kwargs):
            raise RuntimeError("simulated nvImageCodec failure (a lost device)")

    stage._decoder = Broken()
    inputs = prepared(stage, photo_bytes(photos, 1).values())
    assembled = stage.assemble(inputs)
    assert assembled.failed == list(range(len(inputs))) and assembled.batch is None


def test_load_fails_when_the_probe_jpeg_does_not_decode(monkeypatch):
    """A node whose nvImageCodec has no working decoder (no nvJPEG) must fail at load, not per image."""
    stage = GpuDecodeStage(SPEC, device="cpu")
    monkeypatch.setattr(GpuDecodeStage, "_decode", lambda self, blobs: [None] * len(blobs))
    with pytest.raises(DecodeStageError, match="probe JPEG"):
        stage.load()


def test_device_batches_give_the_host_paths_outputs(tiny_bundle, photos):
    spec = ModelSpec.load(tiny_bundle)
    crops = np.stack([decode_and_crop(d, spec.preprocessing) for d in photo_bytes(photos, 1).values()])
    with TorchCudaRunner(tiny_bundle, device="cpu", precision="fp32") as runner:
        assert runner.batch_device == "cpu"
        host = runner.submit(crops, True).result()
        device = runner.submit_device(torch.from_numpy(crops.copy()), True).result()
        with pytest.raises(RunnerError, match="uint8"):
            runner.submit_device(torch.zeros((1, 224, 224, 3)), False)
        with pytest.raises(RunnerError, match=r"\(N, 224, 224, 3\)"):
            runner.submit_device(torch.zeros((1, 3, 224, 224), dtype=torch.uint8), False)
    np.testing.assert_array_equal(device.probabilities, host.probabilities)
    np.testing.assert_array_equal(device.features, host.features)
    with OnnxRuntimeRunner(tiny_bundle) as runner, pytest.raises(RunnerError, match="host arrays only"):
        runner.submit_device(torch.from_numpy(crops), False)


def label(tiny_bundle, paths, stage, **options):
    records, lock = {}, threading.Lock()

    def keep(record):
        with lock:
            records[record["path"]] = record

    runner = TorchCudaRunner(tiny_bundle, device="cpu", precision="fp32")
    with LabelingService(
        runner, ServiceOptions(max_batch_size=8, decode_threads=2, **options), stage
    ) as service:
        for path in paths:
            service.submit(str(path), keep)
        assert service.drain(timeout=120)
    return records


def test_service_gives_every_file_one_record_and_bad_files_the_cpu_paths_errors(
    tiny_bundle, photo_dir, tmp_path
):
    """(Labels agreeing is tests/precision/test_gpu_decode_labels.py: this random-weight bundle
    labels every image alike.)"""
    good = sorted(photo_dir.glob("*.jpg"))
    (tmp_path / "garbage.jpg").write_bytes(GARBAGE)
    (tmp_path / "truncated.jpg").write_bytes(good[0].read_bytes()[:3000])
    (tmp_path / "text.jpg").write_text("not an image")
    cv2.imwrite(str(tmp_path / "cat.png"), cv2.imread(str(photo_dir / "cat.jpg")))
    paths = good + sorted(tmp_path.iterdir())
    gpu = label(tiny_bundle, paths, GpuDecodeStage(ModelSpec.load(tiny_bundle), device="cpu"))
    cpu = label(tiny_bundle, paths, CpuDecodeStage())
    assert set(gpu) == set(cpu) == {str(p) for p in paths}
    errors = {p.rsplit("/", 1)[1]: r["error"] for p, r in gpu.items() if "error" in r}
    assert errors == {p.rsplit("/", 1)[1]: r["error"] for p, r in cpu.items() if "error" in r}
    assert {name: e["code"] for name, e in errors.items()} == dict.fromkeys(
        ["garbage.jpg", "text.jpg", "truncated.jpg"], "decode_failed"
    )
    assert all("labels" in gpu[str(p)] for p in good + [tmp_path / "cat.png"])


def test_images_the_stage_fails_on_are_labeled_by_opencv(tiny_bundle, photo_dir, monkeypatch):
    """Every other image 'fails' in the stage (injected): all are still labeled and no batch fails;
    those images' embeddings are the OpenCV path's exactly, the others' are the stage's own."""
    paths = sorted(photo_dir.glob("*.jpg"))
    failing = {p.read_bytes() for p in paths[::2]}
    real = GpuDecodeStage._decode

    def decode(self, blobs):
        return [
            None if data in failing else image for data, image in zip(blobs, real(self, blobs), strict=True)
        ]

    monkeypatch.setattr(GpuDecodeStage, "_decode", decode)
    gpu = label(
        tiny_bundle, paths, GpuDecodeStage(ModelSpec.load(tiny_bundle), device="cpu"), embeddings=True
    )
    cpu = label(tiny_bundle, paths, CpuDecodeStage(), embeddings=True)
    assert len(gpu) == len(paths) and all("labels" in r for r in gpu.values())
    for index, path in enumerate(paths):
        same = np.allclose(gpu[str(path)]["embedding"], cpu[str(path)]["embedding"], rtol=0, atol=1e-6)
        assert same == (index % 2 == 0), (path, "fell back" if index % 2 == 0 else "decoded by the stage")


def test_auto_falls_back_to_the_cpu_stage_when_the_gpu_stage_cannot_load(tiny_bundle, photo_dir, monkeypatch):
    def broken_load(self):
        raise DecodeStageError("simulated: no nvJPEG on this node")

    monkeypatch.setattr(GpuDecodeStage, "load", broken_load)
    paths = sorted(photo_dir.glob("*.jpg"))[:3]
    records = label(tiny_bundle, paths, GpuDecodeStage(SPEC, device="cpu", optional=True))
    assert all("labels" in r for r in records.values()) and len(records) == 3
    with pytest.raises(DecodeStageError):  # `gpu` asked for explicitly: the service does not start
        label(tiny_bundle, paths, GpuDecodeStage(SPEC, device="cpu"))


def test_create_stage_resolves_cpu_gpu_auto_for_the_torch_runner(tiny_bundle, monkeypatch):
    """With a runner that takes device batches (the ONNX Runtime cases: tests/test_decode_choice.py)."""
    torch_runner = TorchCudaRunner(tiny_bundle, device="cpu", precision="fp32")
    assert isinstance(create_stage("cpu", torch_runner), CpuDecodeStage)
    stage = create_stage("auto", torch_runner)
    assert isinstance(stage, GpuDecodeStage) and stage.optional and stage.device_name == "cpu"
    assert not create_stage("gpu", torch_runner).optional
    with pytest.raises(RunnerError, match="unknown decode stage"):
        create_stage("nvjpeg", torch_runner)
    monkeypatch.setattr(decode_choice.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RunnerError, match="nvImageCodec is not installed"):
        create_stage("gpu", torch_runner)
    assert isinstance(create_stage("auto", torch_runner), CpuDecodeStage)
