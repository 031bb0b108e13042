"""worker.runners.tensorrt_runner against FAKE tensorrt and pycuda modules (recording, no GPU).

Checks what our runner is responsible for: choosing the engine for this GPU / TensorRT version /
model, refusing the rest with a rebuild hint, never loading from outside the bundle, buffer sizes
from the profile's max batch, the tensor-name API, chunks on separate streams with the next copy
queued before the previous chunk is waited for, FP16 outputs widened, resources released."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine_build.tensorrt_engine import EngineSettings, build_engine
from worker.runners.base import RunnerError
from worker.runners.gpu_info import GpuInfo
from worker.runners.tensorrt_runner import TensorRTRunner

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def _engine(bundle, max_batch=64, gpu=H100, precision="fp16") -> dict:
    settings = EngineSettings(precision, opt_batch=max_batch // 2, max_batch=max_batch)
    return build_engine(bundle, settings, gpu=gpu, echo=lambda _m: None)


def _crops(values: list[int]) -> np.ndarray:
    return np.stack([np.full((32, 32, 3), v, np.uint8) for v in values])


def test_fake_trt_runner_buffers_names_and_results(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    fake_gpu.calls.clear()
    runner = TensorRTRunner(fake_bundle, precision="fp16", slots=2, min_chunk=4)
    assert runner.max_batch_size == 64  # known from the record before load (the service asks early)
    with runner:
        assert fake_gpu.named("make_context") == [("make_context", 0)]
        host = fake_gpu.named("pagelocked_empty")
        assert ("pagelocked_empty", (64, 32, 32, 3), np.dtype(np.uint8)) in host
        assert ("pagelocked_empty", (64, 4), np.dtype(np.float32)) in host
        assert len(host) == 2 * 3  # two slots x (input, probabilities, features)
        assert sorted(c[1] for c in fake_gpu.named("mem_alloc"))[-1] == 64 * 32 * 32 * 3
        profiles = fake_gpu.named("set_optimization_profile_async")
        assert [c[2] for c in profiles] == [0, 1]  # each context on its own profile
        assert profiles[0][1] != profiles[1][1]
        addressed = {(c[1], c[2]) for c in fake_gpu.named("set_tensor_address")}
        assert {name for _ctx, name in addressed} == {"images", "probabilities", "features"}
        values = [0, 1, 2, 3, 5, 6, 7, 9]
        out = runner.infer(_crops(values), want_features=True)
    np.testing.assert_array_equal(out.probabilities.argmax(1), np.array(values) % 4)
    np.testing.assert_allclose(out.features[:, 0], values)
    assert out.probabilities.dtype == np.float32
    shapes = [c[3] for c in fake_gpu.named("set_input_shape")]
    assert shapes == [(4, 32, 32, 3), (4, 32, 32, 3)]  # two chunks, one per slot
    assert fake_gpu.named("context_pop") == [("context_pop",)]
    assert len(fake_gpu.named("free")) == 6


def test_fake_trt_runner_queues_next_copy_before_waiting_on_the_first_chunk(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", slots=2, min_chunk=8) as runner:
        fake_gpu.calls.clear()
        runner.infer(_crops(list(range(32))))
    order = [
        (c[0], c[1])
        for c in fake_gpu.calls
        if c[0] in ("memcpy_htod_async", "execute_async_v3", "stream_synchronize")
    ]
    (first_copy, second_copy) = [c for c in fake_gpu.calls if c[0] == "memcpy_htod_async"]
    assert first_copy[1] != second_copy[1]  # chunks on different streams
    first_sync = order.index(("stream_synchronize", first_copy[1]))
    assert order.index(("memcpy_htod_async", second_copy[1])) < first_sync
    executes = fake_gpu.named("execute_async_v3")
    assert [e[2] for e in executes] == [first_copy[1], second_copy[1]]  # each runs on its own stream


def test_fake_trt_runner_uses_one_slot_for_a_single_profile_engine(fake_gpu, fake_bundle):
    fake_gpu.profiles = 1  # e.g. an engine built with profiles=1
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", slots=2, min_chunk=4) as runner:
        out = runner.infer(_crops(list(range(16))))
    assert len(fake_gpu.named("create_execution_context")) == 1
    np.testing.assert_array_equal(out.probabilities.argmax(1), np.arange(16) % 4)


def test_fake_trt_runner_small_batch_stays_whole(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", min_chunk=16) as runner:
        fake_gpu.calls.clear()
        out = runner.infer(_crops([1, 2, 3]))
    assert [c[3] for c in fake_gpu.named("set_input_shape")] == [(3, 32, 32, 3)]
    assert out.probabilities.shape == (3, 4)


def test_fake_trt_runner_widens_fp16_engine_outputs(fake_gpu, fake_bundle):
    fake_gpu.output_dtype = "float16"
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16") as runner:
        out = runner.infer(_crops([2, 3]))
    assert ("pagelocked_empty", (64, 4), np.dtype(np.float16)) in fake_gpu.named("pagelocked_empty")
    assert out.probabilities.dtype == np.float32
    np.testing.assert_array_equal(out.probabilities.argmax(1), [2, 3])


def test_fake_trt_runner_refuses_engine_for_another_gpu_with_rebuild_hint(fake_gpu, fake_bundle):
    _engine(fake_bundle, gpu=GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    runner = TensorRTRunner(fake_bundle, precision="fp16")
    with pytest.raises(RunnerError) as caught:
        runner.load()
    message = str(caught.value)
    assert "built for NVIDIA A100-SXM4-80GB" in message
    assert f"labeler build {fake_bundle} --tensorrt --precision fp16" in message
    assert fake_gpu.named("deserialize_cuda_engine") == []
    assert fake_gpu.named("context_pop") == [("context_pop",)]  # the CUDA context is not leaked


def test_fake_trt_runner_refuses_other_tensorrt_version(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    import sys

    sys.modules["tensorrt"].__version__ = "11.5.0"
    with pytest.raises(RunnerError, match="TensorRT 11.4.0"):
        TensorRTRunner(fake_bundle, precision="fp16").load()


def test_fake_trt_runner_refuses_stale_engine_after_model_changes(fake_gpu, fake_bundle):
    record = _engine(fake_bundle)
    record_path = fake_bundle / "engines" / record["engine_file"].replace(".engine", ".json")
    record["onnx_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    with pytest.raises(RunnerError, match="older model"):
        TensorRTRunner(fake_bundle, precision="fp16").load()


def test_fake_trt_runner_refuses_tampered_engine(fake_gpu, fake_bundle):
    record = _engine(fake_bundle)
    (fake_bundle / "engines" / record["engine_file"]).write_bytes(b"FAKE-ENGINE but edited")
    with pytest.raises(RunnerError, match="checksum"):
        TensorRTRunner(fake_bundle, precision="fp16").load()
    assert fake_gpu.named("deserialize_cuda_engine") == []


def test_fake_trt_runner_never_loads_from_outside_the_bundle(fake_gpu, fake_bundle, tmp_path):
    record = _engine(fake_bundle)
    record_path = fake_bundle / "engines" / record["engine_file"].replace(".engine", ".json")
    outside = tmp_path / "elsewhere.engine"
    outside.write_bytes(b"FAKE-ENGINE")
    record["engine_file"] = "../../elsewhere.engine"
    record_path.write_text(json.dumps(record))
    with pytest.raises(RunnerError, match="outside"):
        TensorRTRunner(fake_bundle, precision="fp16").load()
    # a link inside engines/ that leads out of it is refused too
    engine = fake_bundle / "engines" / "linked.engine"
    os.symlink(outside, engine)
    record["engine_file"] = "linked.engine"
    record_path.write_text(json.dumps(record))
    with pytest.raises(RunnerError, match="outside"):
        TensorRTRunner(fake_bundle, precision="fp16").load()
    assert fake_gpu.named("deserialize_cuda_engine") == []


def test_fake_trt_runner_reports_failed_execution(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16") as runner:
        fake_gpu.execute_ok = False
        with pytest.raises(RunnerError, match="execute_async_v3 failed"):
            runner.infer(_crops([1, 2]))
        with pytest.raises(RunnerError, match="exceeds the engine's maximum 64"):
            runner.infer(_crops(list(range(65))))


def test_fake_trt_runner_serves_the_labeling_service(fake_gpu, fake_bundle, photo_dir):
    """Real files, real decode threads and batcher; only the engine is fake."""
    from worker.pipeline.service import LabelingService, ServiceOptions

    _engine(fake_bundle)
    records = []
    runner = TensorRTRunner(fake_bundle, precision="fp16")
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    with LabelingService(runner, ServiceOptions(max_batch_size=128, decode_threads=2)) as service:
        assert service.batch_size == 64  # capped at the engine's profile maximum
        for path in [*paths, str(photo_dir / "missing.jpg")]:
            service.submit(path, records.append)
        service.drain()
    assert len(records) == len(paths) + 1
    assert sum("labels" in r for r in records) == len(paths)
    assert [r["error"]["code"] for r in records if "error" in r] == ["not_found"]


def test_fake_trt_runner_submit_keeps_one_batch_per_slot_and_refuses_a_third(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", slots=2) as runner:
        assert runner.pipeline_depth == 2
        first, second = runner.submit(_crops([1, 2, 3])), runner.submit(_crops([5, 6]))
        with pytest.raises(RunnerError, match="uncollected"):
            runner.submit(_crops([7]))  # its outputs would overwrite the first batch's
        np.testing.assert_array_equal(first.result().probabilities.argmax(1), [1, 2, 3])
        third = runner.submit(_crops([7]))
        np.testing.assert_array_equal(second.result().probabilities.argmax(1), [1, 2])
        np.testing.assert_array_equal(third.result().probabilities.argmax(1), [3])
    shapes = [c[3][0] for c in fake_gpu.named("set_input_shape")]
    assert shapes == [3, 2, 1]  # a submitted batch is not split: the other slot holds the next one


def test_fake_trt_runner_frees_the_slots_of_a_half_queued_batch(fake_gpu, fake_bundle):
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", slots=2, min_chunk=4) as runner:
        fake_gpu.failing_executes = {1}  # the second chunk fails after the first was queued
        with pytest.raises(RunnerError, match="execute_async_v3 failed"):
            runner.infer(_crops(list(range(8))))
        out = runner.infer(_crops(list(range(8))))  # no slot left busy by the failed batch
    np.testing.assert_array_equal(out.probabilities.argmax(1), np.arange(8) % 4)


def _decode_all_then_start(service, paths: list[str], records: list) -> None:
    """Queue every crop before the inference thread starts, so batch formation is deterministic."""
    import time

    for path in paths:
        service.submit(path, records.append)
    deadline = time.monotonic() + 60
    while service._ready.qsize() < len(paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    service.start()
    service.drain()
    service.close()


def test_fake_trt_service_starts_the_next_batch_before_waiting_for_the_last(fake_gpu, fake_bundle, photo_dir):
    """The labeling service keeps pipeline_depth batches on the GPU: batch n+1's copy-in is queued
    before batch n is waited for, and every record still gets its own image's outputs."""
    from worker.pipeline.preprocess import decode_and_crop
    from worker.pipeline.service import LabelingService, ServiceOptions
    from worker.sidecar import ModelSpec

    _engine(fake_bundle)
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    records: list[dict] = []
    runner = TensorRTRunner(fake_bundle, precision="fp16", slots=2)
    service = LabelingService(runner, ServiceOptions(max_batch_size=4, decode_threads=2, top_k=1))
    _decode_all_then_start(service, paths, records)

    assert dict(service.batch_stats.by_size) == {4: len(paths) // 4}
    prep = ModelSpec.load(fake_bundle).preprocessing
    for record in records:
        crop = decode_and_crop(Path(record["path"]).read_bytes(), prep)
        assert record["labels"][0]["label"] == "abcd"[int(crop.mean()) % 4], record["path"]
    open_streams: set[int] = set()
    copies_while_another_batch_runs = 0
    for call in fake_gpu.calls:
        if call[0] == "memcpy_htod_async":
            copies_while_another_batch_runs += bool(open_streams - {call[1]})
            open_streams.add(call[1])
        elif call[0] == "stream_synchronize":
            open_streams.discard(call[1])
    assert copies_while_another_batch_runs == service.batch_stats.batches - 1


def test_fake_trt_service_turns_a_failed_wait_into_error_records_and_goes_on(
    fake_gpu, fake_bundle, photo_dir
):
    from worker.pipeline.service import LabelingService, ServiceOptions

    _engine(fake_bundle)
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    records: list[dict] = []
    runner = TensorRTRunner(fake_bundle, precision="fp16", slots=2)
    service = LabelingService(runner, ServiceOptions(max_batch_size=4, decode_threads=2))
    fake_gpu.failing_waits = {1}  # wait 0 is the warm-up at load; the first batch's wait fails
    _decode_all_then_start(service, paths, records)

    failed = [r for r in records if "error" in r]
    assert len(records) == len(paths)
    assert len(failed) == 4
    assert {r["error"]["code"] for r in failed} == {"inference_failed"}
    assert "illegal memory access" in failed[0]["error"]["message"]
    assert dict(service.batch_stats.by_size) == {4: len(paths) // 4 - 1}  # the later batches all ran


def test_fake_trt_runner_stages_a_batch_in_the_next_free_slot(fake_gpu, fake_bundle):
    """staging() is the pinned input buffer of the slot submit() will take next: a batch stacked
    into it is sent from there; while that slot still holds an uncollected batch there is none."""
    _engine(fake_bundle)
    with TensorRTRunner(fake_bundle, precision="fp16", slots=2) as runner:
        first_buffer = runner.staging(3)
        np.stack(list(_crops([1, 2, 3])), out=first_buffer)
        first = runner.submit(first_buffer)
        second_buffer = runner.staging(2)
        assert not np.shares_memory(first_buffer, second_buffer)  # the other slot's buffer
        second = runner.submit(np.stack(list(_crops([5, 6])), out=second_buffer))
        assert runner.staging(1) is None  # both slots hold batches nobody has collected
        np.testing.assert_array_equal(first.result().probabilities.argmax(1), [1, 2, 3])
        np.testing.assert_array_equal(second.result().probabilities.argmax(1), [1, 2])
        assert runner.staging(65) is None  # over the profile's maximum batch
    copies = fake_gpu.named("memcpy_htod_async")
    assert [c[3] for c in copies[-2:]] == [(3, 32, 32, 3), (2, 32, 32, 3)]
