"""What `--embeddings` costs per image on the CPU, before and after issue 18's change.

    PYTHONPATH=. .venv/bin/python bench/bench_embeddings.py [--images 4096] [--batch 32] [--repeats 7]

Three steps a record with 2048-d float32 features goes through, each timed without embeddings,
with them as the code was ("before": each value rounded in Python into a list of floats, the list
turned back into an array per row when the shard is written; copied here verbatim) and as it is
now ("after": worker.records and worker.dataset.schema):

- records: top-k labels and `label_record` for a batch of engine outputs (the inference thread);
- JSON line: `compact_json` of each record (`labeler run --out x.jsonl`, also the inference thread);
- table: `records_to_table` of a shard of records (a dataset shard's conversion, before zstd).

The three variants are interleaved in every repeat and each figure is a median of per-repeat
ratios to the same step without embeddings in that repeat, so the ratios hold on a loaded machine.
Memory held per record (tracemalloc) is printed last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from common import cpu_name  # noqa: E402

import worker.dataset.schema as dataset_schema  # noqa: E402
from worker.dataset.schema import DatasetSpec, records_to_table  # noqa: E402
from worker.pipeline.labels import top_k_labels  # noqa: E402
from worker.records import compact_json, label_record  # noqa: E402

CLASSES = (REPO / "engine_build" / "data" / "imagenet_classes.txt").read_text().split()
MODEL_SHA = "3f1c0a9b7e2d4c5f8a6b1e0d9c7f2a4b6e8d0c1f3a5b7d9e2c4f6a8b0d1e3f5a"
FEATURES = 2048
Record = dict[str, Any]


# -- the code before (worker/records.py and worker/dataset/schema.py at main, verbatim) ---------


def before_label_record(
    path: str, labels: list[dict[str, Any]], embedding: np.ndarray | None = None
) -> Record:
    record: Record = {"path": path, "labels": labels}
    if embedding is not None:
        record["embedding"] = [round(float(v), 6) for v in embedding]
    return record


def before_embedding_array(rows: list[Any], spec: DatasetSpec) -> pa.Array:
    size = spec.embedding_size
    assert size is not None
    dtype = np.dtype(spec.embedding_dtype)
    block = np.zeros((len(rows), size), dtype=dtype)
    valid = np.ones(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is None:
            valid[i] = False
            continue
        vector = np.asarray(row)
        if vector.shape != (size,):
            raise dataset_schema.DatasetError(
                f"embedding of shape {vector.shape}, the run's feature size is {size}"
            )
        block[i] = vector
    values = pa.array(block.reshape(-1))
    validity = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.Array.from_buffers(pa.list_(values.type, size), len(rows), [validity], children=[values])


@contextmanager
def conversion_before() -> Iterator[None]:
    """records_to_table with the embedding column built as before (the rest of it is unchanged)."""
    now = dataset_schema._embedding_array
    dataset_schema._embedding_array = before_embedding_array
    try:
        yield
    finally:
        dataset_schema._embedding_array = now


# -- the workload ---------------------------------------------------------------------------------


def engine_outputs(images: int, batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Softmax rows over 1,000 classes and post-ReLU-like pooled features, batch by batch."""
    rng = np.random.default_rng(seed)
    outputs = []
    for start in range(0, images, batch):
        n = min(batch, images - start)
        logits = rng.normal(0, 3, (n, len(CLASSES))).astype(np.float32)
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        features = rng.gamma(0.7, 0.6, (n, FEATURES)).astype(np.float32)
        outputs.append((probabilities, features))
    return outputs


def build_records(
    outputs: list[tuple[np.ndarray, np.ndarray]], make: Callable[..., Record] | None
) -> list[Record]:
    """What the service's _finish_batch does per batch: top-5 labels, then one record per row."""
    records: list[Record] = []
    for probabilities, features in outputs:
        labels = top_k_labels(probabilities, CLASSES, 5)
        for row in range(len(labels)):
            path = f"/data/imagenet/val/ILSVRC2012_val_{len(records):08d}.JPEG"
            if make is None:
                records.append(label_record(path, labels[row]))
            else:
                records.append(make(path, labels[row], features[row]))
    return records


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def held_per_record(make: Callable[[], list[Record]]) -> float:
    """Bytes still allocated per record once the records are built (Python objects and arrays)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        records = make()
        return (tracemalloc.get_traced_memory()[0] - base) / len(records)
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4096, help="Images per step (one shard) [4096].")
    parser.add_argument("--batch", type=int, default=32, help="Engine batch size [32].")
    parser.add_argument("--repeats", type=int, default=7, help="Interleaved repeats [7].")
    args = parser.parse_args()

    outputs = engine_outputs(args.images, args.batch)
    plain_spec = DatasetSpec(MODEL_SHA, "fp32")
    embedding_spec = DatasetSpec(MODEL_SHA, "fp32", embedding_size=FEATURES)
    when = datetime.now(UTC)

    def table(records: list[Record], spec: DatasetSpec) -> pa.Table:
        return records_to_table(records, spec, shard_id="000001", worker="bench", labeled_at=when)

    def table_before(records: list[Record]) -> pa.Table:
        with conversion_before():
            return table(records, embedding_spec)

    plain = build_records(outputs, None)
    before = build_records(outputs, before_label_record)
    after = build_records(outputs, label_record)
    steps: dict[str, dict[str, Callable[[], object]]] = {
        "records": {
            "none": lambda: build_records(outputs, None),
            "before": lambda: build_records(outputs, before_label_record),
            "after": lambda: build_records(outputs, label_record),
        },
        "JSON line": {
            "none": lambda: [compact_json(r) for r in plain],
            "before": lambda: [compact_json(r) for r in before],
            "after": lambda: [compact_json(r) for r in after],
        },
        "table": {
            "none": lambda: table(plain, plain_spec),
            "before": lambda: table_before(before),
            "after": lambda: table(after, embedding_spec),
        },
    }
    if [compact_json(r) for r in before] != [compact_json(r) for r in after]:
        raise SystemExit("the JSON lines differ before and after")
    if not table_before(before).equals(table(after, embedding_spec)):
        raise SystemExit("the tables differ before and after")

    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for step, variants in steps.items():
            for variant, run in variants.items():
                seconds.setdefault((step, variant), []).append(timed(run))

    print(
        f"{cpu_name()}, {args.images} images, batch {args.batch}, {FEATURES}-d float32, {args.repeats} repeats"
    )
    print("step        none us/img   before us/img (x none)   after us/img (x none)   before/after")
    for step in steps:
        none, old, new = (seconds[(step, v)] for v in ("none", "before", "after"))
        per = {
            v: statistics.median(seconds[(step, v)]) / args.images * 1e6 for v in ("none", "before", "after")
        }
        old_ratio = statistics.median(o / n for o, n in zip(old, none, strict=True))
        new_ratio = statistics.median(a / n for a, n in zip(new, none, strict=True))
        gain = statistics.median(o / a for o, a in zip(old, new, strict=True))
        print(
            f"{step:<11} {per['none']:>11.1f}   {per['before']:>9.1f} ({old_ratio:>6.1f}x)"
            f"       {per['after']:>8.1f} ({new_ratio:>5.2f}x)      {gain:>6.1f}x"
        )
    held = {
        name: held_per_record(lambda make=make: build_records(outputs[:16], make))
        for name, make in (("none", None), ("before", before_label_record), ("after", label_record))
    }
    print("held per record: " + ", ".join(f"{name} {value / 1024:.1f} KiB" for name, value in held.items()))


if __name__ == "__main__":
    main()
