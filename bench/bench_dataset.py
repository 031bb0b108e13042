"""The result dataset's bytes per image and write/read rates, against JSONL and protocol 1's Redis hash.

    python bench/bench_dataset.py [--images 24000] [--shard-size 4000] [--top-k 5] [--feature-size 2048]

Records as a ResNet-50 run makes them: ImageNet-style paths (`/data/imagenet/train/<class>/...`,
class names from engine_build/data/imagenet_classes.txt) in sorted shards as `labeler enqueue`
cuts a walked directory, top-k softmax scores rounded to 6 decimals, the folder's class as top-1
for 76 % of images (ResNet-50's top-1 accuracy), 0.5 % error records, and for the embedding runs
post-ReLU-like features (gamma distributed, non-negative, about as compressible as real ones:
barely). Three datasets: no embeddings, float32 and float16 embeddings, each written with
`write_shard` (conversion, zstd, fsync, rename) into a temporary folder on the system's disk,
`--rounds` times (each round rewrites the same shards). Reading is `iter_records` (record dicts,
what `labeler results` writes as JSONL).
Then the same table under other Parquet settings, to justify the module's choices.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from common import cpu_name  # noqa: E402

from worker.dataset.files import ROWS_PER_GROUP, iter_records, write_shard  # noqa: E402
from worker.dataset.schema import DICTIONARY_COLUMNS, DatasetSpec, records_to_table  # noqa: E402

CLASSES = (REPO / "engine_build" / "data" / "imagenet_classes.txt").read_text().split()
MODEL_SHA = "3f1c0a9b7e2d4c5f8a6b1e0d9c7f2a4b6e8d0c1f3a5b7d9e2c4f6a8b0d1e3f5a"
REDIS_BYTES_PER_IMAGE = 411  # issue 11, measured on main: RunStore hash, 200k top-5 records


def make_records(images: int, top_k: int, feature_size: int | None, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    folders = rng.integers(0, len(CLASSES), images)
    numbers = rng.integers(0, 1_300_000, images)
    paths = sorted(
        {
            f"/data/imagenet/train/{CLASSES[c]}/{CLASSES[c]}_{n:07d}.JPEG"
            for c, n in zip(folders, numbers, strict=True)
        }
    )
    features = rng.gamma(0.7, 0.6, (len(paths), feature_size)).astype(np.float32) if feature_size else None
    records: list[dict[str, Any]] = []
    for row, path in enumerate(paths):
        if rng.random() < 0.005:
            records.append(
                {"path": path, "error": {"code": "decode_failed", "message": "cannot decode the image"}}
            )
            continue
        own = CLASSES.index(path.split("/")[4])
        others = [int(i) for i in rng.choice(len(CLASSES), top_k + 1, replace=False) if i != own][:top_k]
        indices = [own, *others[: top_k - 1]] if rng.random() < 0.76 else others
        scores = np.sort(rng.dirichlet(np.full(top_k + 3, 0.4)))[::-1][:top_k]
        record: dict[str, Any] = {
            "path": path,
            "labels": [
                {"index": i, "label": CLASSES[i], "score": round(float(s), 6)}
                for i, s in zip(indices, scores, strict=True)
            ],
        }
        if features is not None:
            record["embedding"] = features[row]  # a worker hands NumPy rows over
        records.append(record)
    return records


def write_dataset(
    out: Path, records: list[dict[str, Any]], spec: DatasetSpec, shard_size: int
) -> tuple[int, float]:
    started = time.perf_counter()
    total = 0
    for number, start in enumerate(range(0, len(records), shard_size)):
        shard = write_shard(
            out, f"{number:06d}", records[start : start + shard_size], spec, worker="gpu-node-07"
        )
        total += shard.bytes
    return total, time.perf_counter() - started


def read_rate(out: Path) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in iter_records(out))
    return count / (time.perf_counter() - started)


def jsonl_bytes(records: list[dict[str, Any]]) -> int:
    """Today's `labeler results --out x.jsonl` (embeddings as the worker rounds them)."""
    total = 0
    for record in records:
        if "embedding" in record:
            record = {**record, "embedding": [round(float(v), 6) for v in record["embedding"]]}
        total += len(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()) + 1
    return total


def alternatives(table: pa.Table, folder: Path) -> dict[str, int]:
    """One shard's table under other Parquet settings (what the module's choices are against)."""
    base: dict[str, Any] = dict(use_dictionary=DICTIONARY_COLUMNS, write_statistics=True)
    variants = {
        "zstd (the module's)": dict(base, compression="zstd"),
        "snappy (pyarrow's default)": dict(base, compression="snappy"),
        "uncompressed": dict(base, compression="none"),
        "zstd, dictionary on every column": dict(compression="zstd"),
        "zstd, path DELTA_BYTE_ARRAY": dict(
            base, compression="zstd", column_encoding={"path": "DELTA_BYTE_ARRAY"}
        ),
    }
    if "embedding" in table.column_names:
        variants["zstd level 9"] = dict(base, compression="zstd", compression_level=9)
        if table.schema.field("embedding").type.value_type == pa.float32():
            # Parquet names a list's leaf column <name>.list.element
            split = {"embedding.list.element": "BYTE_STREAM_SPLIT"}
            variants["zstd, embedding BYTE_STREAM_SPLIT"] = dict(
                base, compression="zstd", column_encoding=split
            )
    sizes = {}
    for name, options in variants.items():
        path = folder / "variant.parquet"
        pq.write_table(table, path, row_group_size=ROWS_PER_GROUP, **options)
        sizes[name] = path.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24000)
    parser.add_argument("--shard-size", type=int, default=4000)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--feature-size", type=int, default=2048)
    parser.add_argument(
        "--rounds", type=int, default=3, help="writes of each dataset (rewrites); median rate"
    )
    args = parser.parse_args()
    print(f"{cpu_name()}, Python {platform.python_version()}, pyarrow {pa.__version__}")
    plain = make_records(args.images, args.top_k, None)
    with_features = make_records(args.images, args.top_k, args.feature_size)
    runs = [
        ("no embeddings", plain, DatasetSpec(MODEL_SHA, "fp16")),
        (
            f"{args.feature_size}-d float32",
            with_features,
            DatasetSpec(MODEL_SHA, "fp16", args.feature_size, "float32"),
        ),
        (
            f"{args.feature_size}-d float16",
            with_features,
            DatasetSpec(MODEL_SHA, "fp16", args.feature_size, "float16"),
        ),
    ]
    print(
        f"{len(plain)} images, shards of {args.shard_size}, top-{args.top_k}; Redis hash of protocol 1 (retired): "
        f"{REDIS_BYTES_PER_IMAGE} B/image (no embeddings)"
    )
    print("| dataset | bytes/image | JSONL bytes/image | write rows/s, median (range) | read records/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        for name, records, spec in runs:
            out = Path(tmp) / name.replace(" ", "-")
            rates = []
            for _ in range(args.rounds):  # later rounds replace the same shard files
                size, seconds = write_dataset(out, records, spec, args.shard_size)
                rates.append(len(records) / seconds)
            print(
                f"| {name} | {size / len(records):,.1f} | {jsonl_bytes(records) / len(records):,.0f} | "
                f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {read_rate(out):,.0f} |"
            )
        print("\nOne shard's bytes/image under other Parquet settings:")
        for name, records, spec in runs:
            shard = records[: args.shard_size]
            table = records_to_table(
                shard, spec, shard_id="000000", worker="gpu-node-07", labeled_at=datetime.now(UTC)
            )
            sizes = alternatives(table, Path(tmp))
            print(f"  {name}: " + ", ".join(f"{k} {v / len(shard):,.1f}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
