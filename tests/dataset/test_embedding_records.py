"""A record's embedding stays a float32 array from the engine to the Parquet column (issue 18), and
every output still says what the rounded lists of Python floats said: JSON lines, Celery results,
float32 and float16 columns."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, datetime

import numpy as np
import pytest
from dataset_records import MODEL_SHA
from kombu.utils.json import dumps as kombu_dumps

from worker.dataset.schema import DatasetSpec, batch_to_records, records_to_table
from worker.records import compact_json, label_record

SIZE = 2048
LABELS = [{"index": 3, "label": "tench", "score": 0.912345}]


def features(rows: int, seed: int = 0) -> np.ndarray:
    """Post-ReLU-like pooled features, with values that test the rounding: halves of the sixth
    decimal (k / 128 is one), values past 8 where float32 steps exceed 5e-7, zeros, tiny ones."""
    rng = np.random.default_rng(seed)
    block = rng.gamma(0.7, 0.6, (rows, SIZE)).astype(np.float32)
    block[:, :64] = np.arange(1, 65, dtype=np.float32) / 128
    block[:, 64:128] = rng.uniform(8, 300, (rows, 64))
    block[:, 128:136] = [0.0, 1e-7, 4.999e-7, 5e-7, 5.001e-7, 1e-30, 2.5e-6, 123.4567891]
    return block


def rounded_lists(block: np.ndarray) -> list[list[float]]:
    """What records carried before: each value rounded to 6 decimals in Python."""
    return [[round(float(v), 6) for v in row] for row in block]


def records(embeddings: list) -> list[dict]:
    out: list[dict] = [{"path": "/data/broken.jpg", "error": {"code": "decode_failed", "message": "bad"}}]
    for i, embedding in enumerate(embeddings):
        out.append({"path": f"/data/img_{i:04d}.jpg", "labels": LABELS, "embedding": embedding})
    return out


def test_a_record_holds_its_embedding_in_four_bytes_a_value():
    """A list of 2048 Python floats held ~65 KiB per record (every shard's records are held until
    the shard is written) and was built element by element on the inference thread."""
    block = features(32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [label_record(f"/data/{i}.jpg", LABELS, row) for i, row in enumerate(block)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert held < 4 * SIZE + 2048, f"{held / 1024:.1f} KiB per record"


def test_the_record_owns_its_values():
    """A runner may reuse its output buffers for the next batch: the record keeps a copy."""
    block = features(2)
    record = label_record("/data/a.jpg", LABELS, block[0])
    block[0] = -1.0
    assert float(np.min(record["embedding"])) >= 0.0


def test_json_forms_are_the_rounded_lists():
    """`compact_json` (JSONL files, Redis) and kombu's encoder (a labels-in-the-result job's
    Celery result) both write the values rounded exactly as before."""
    block = features(3, seed=1)
    for row, want in zip(block, rounded_lists(block), strict=True):
        record = label_record("/data/a.jpg", LABELS, row)
        expected = {"path": "/data/a.jpg", "labels": LABELS, "embedding": want}
        assert compact_json(record) == compact_json(expected)
        assert json.loads(kombu_dumps(record)) == expected


def test_json_still_refuses_what_it_cannot_write():
    with pytest.raises(TypeError, match="ndarray is not JSON serializable"):
        compact_json({"embedding": np.zeros(2, np.float32)})


@pytest.mark.parametrize("dtype, bits", [("float32", np.uint32), ("float16", np.uint16)])
def test_the_parquet_column_holds_what_the_rounded_lists_gave(dtype, bits):
    """The column holds, bit for bit, what the rounded lists became before (one cast of each
    list to the column's type: float16 is not rounded twice), and lists still make it too."""
    block = features(600, seed=2)  # more rows than one rounding chunk
    spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=SIZE, embedding_dtype=dtype)
    when = datetime(2026, 1, 2, tzinfo=UTC)
    arrays = [label_record("/x.jpg", LABELS, row)["embedding"] for row in block]
    made = {
        name: records_to_table(records(rows), spec, shard_id="000001", worker="n", labeled_at=when)
        for name, rows in (("arrays", arrays), ("lists", rounded_lists(block)))
    }
    column = made["arrays"]["embedding"].combine_chunks()
    assert column.null_count == 1
    values = column.values.to_numpy().reshape(-1, SIZE)[1:]  # row 0: the error record
    want = np.asarray(rounded_lists(block)).astype(dtype)
    np.testing.assert_array_equal(values.view(bits), want.view(bits))
    assert made["arrays"].equals(made["lists"])
    assert batch_to_records(made["arrays"].to_batches()[0])[1:] == batch_to_records(
        made["lists"].to_batches()[0]
    )[1:]
