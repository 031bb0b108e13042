"""A real worker builds its labeling service as `labeler run` does: the settings that a worker once
lost (max_pixels, embeddings, and intra-op threads under `--backend auto`) reach its rows."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import redis
from distributed_helpers import assert_exactly_once, enqueue, run_output, wait_run_done

from worker.sidecar import ModelSpec

pytestmark = pytest.mark.slow


def test_worker_honours_max_pixels_embeddings_and_threads_under_auto(
    redis_url, start_worker, small_jpegs, tiny_bundle, tmp_path
):
    wide = tmp_path / "wide.jpg"  # 96x64 = 6144 pixels: over a 5000-pixel cap; the 64x64 ones are under
    cv2.imwrite(str(wide), np.full((64, 96, 3), 128, np.uint8))
    paths = [*small_jpegs[:6], str(wide)]
    worker = start_worker(redis_url, "settings", backend="auto", intra_op_threads=1, max_pixels=5000)
    client = redis.Redis.from_url(redis_url)
    enqueue(client, "drift", paths, shard_size=10, embeddings=True, embedding_dtype="float16")
    wait_run_done(client, "drift", 90)

    records = assert_exactly_once(client, "drift", paths)
    assert records[str(wide)]["error"]["code"] == "too_large"
    assert "over the 5000 cap" in records[str(wide)]["error"]["message"]
    feature_size = ModelSpec.load(tiny_bundle).feature_size
    for path in small_jpegs[:6]:
        assert len(records[path]["embedding"]) == feature_size, path
        assert records[path]["labels"]
    assert "(onnxruntime fp32, 1 intra-op threads)" in worker.log()

    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pq.read_table(run_output("drift") / "labels" / "part-000000.parquet").schema.field("embedding")
    assert column.type == pa.list_(pa.field("element", pa.float16()), feature_size)
