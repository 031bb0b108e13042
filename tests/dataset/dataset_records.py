"""Records of today's shape (worker/records.py) for the dataset tests: ImageNet class names,
top-k scores as the worker rounds them, an error record every few images. Also imported by the
processes the tests start, so it needs nothing from pytest."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from worker.dataset.schema import DatasetSpec

CLASSES = (Path(__file__).parents[2] / "engine_build" / "data" / "imagenet_classes.txt").read_text().split()
MODEL_SHA = hashlib.sha256(b"resnet50 test bundle").hexdigest()


def make_records(
    count: int, *, seed: int = 0, k: int = 5, error_every: int = 7, embedding_size: int | None = None
) -> list[dict[str, Any]]:
    """`count` records for distinct paths, every `error_every`-th an error record."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(count):
        path = f"/data/photos/{seed:03d}/{rng.choice(CLASSES)}/img_{i:06d}.jpg"
        if error_every and i % error_every == error_every - 1:
            records.append(
                {"path": path, "error": {"code": "decode_failed", "message": f"truncated JPEG {i}"}}
            )
            continue
        scores = sorted((rng.random() for _ in range(k)), reverse=True)
        labels = [
            {"index": index, "label": CLASSES[index], "score": round(score / 2, 6)}
            for index, score in zip(rng.sample(range(len(CLASSES)), k), scores, strict=True)
        ]
        record: dict[str, Any] = {"path": path, "labels": labels}
        if embedding_size:
            record["embedding"] = [round(rng.uniform(0, 4), 6) for _ in range(embedding_size)]
        records.append(record)
    return records


def write_repeatedly(out: str, worker: str, start: Any, rounds: int) -> None:
    """One of several processes writing the same shard at once: wait at `start`, write `rounds` times."""
    from worker.dataset.files import write_shard

    records = make_records(2000, seed=11)
    start.wait()
    for _ in range(rounds):
        write_shard(out, "000042", records, DatasetSpec(MODEL_SHA, "fp32"), worker=worker)
