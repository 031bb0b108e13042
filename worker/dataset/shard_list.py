"""A run's fixed shard list, stored with its output: `DIR/shards/<id>.json`, one file per shard.

The first enqueue of a run cuts its inputs into shards of `shard_size` paths, in input order, and
writes each shard's paths before the shard is published; `DIR/shards/index.json` is written when
the listing is complete. From then on the list is the run: enqueueing it again or resuming it
relabels only shards that are not done, and a directory whose listing changed meanwhile can make no
image labeled twice or skipped (new files need a new run). An enqueue killed mid-listing resumes
where it stopped, but only if the inputs still list the same paths up to there: each shard file
carries a hash chained over every path before and in it, checked on resume.

A bisected shard (`000123.1.0`) has no file of its own: its paths are halves of its parent's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.dataset.atomic import atomic_write, ensure_dir
from worker.dataset.files import check_shard_id, shard_sort_key
from worker.dataset.object_path import ObjectPath, as_location

SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
ROOT_ID_DIGITS = 6
GENESIS = "0" * 64


class ShardListError(ValueError):
    """The stored shard list and what an enqueue was given disagree, or the list is damaged."""


def shards_dir(out_dir: Path | str | ObjectPath) -> Path | ObjectPath:
    return as_location(out_dir) / SHARDS_DIR


def root_shard_id(index: int) -> str:
    return f"{index:0{ROOT_ID_DIGITS}d}"


def children(shard_id: str) -> tuple[str, str]:
    """The two halves of a bisected shard."""
    return f"{shard_id}.0", f"{shard_id}.1"


def halves(paths: list[str]) -> tuple[list[str], list[str]]:
    middle = len(paths) // 2
    return paths[:middle], paths[middle:]


def chain_hash(previous: str, paths: Iterable[str]) -> str:
    """The listing hash after `paths`, continuing from `previous`."""
    digest = hashlib.sha256(previous.encode("ascii"))
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredShard:
    shard_id: str
    paths: list[str]
    chain: str


def write_shard_paths(out_dir: Path | str, shard_id: str, paths: list[str], chain: str) -> None:
    folder = shards_dir(out_dir)
    ensure_dir(folder)
    data = json.dumps({"shard": shard_id, "chain": chain, "paths": paths}, ensure_ascii=False).encode()
    atomic_write(folder / f"{check_shard_id(shard_id)}.json", lambda handle: handle.write(data))


def read_stored(out_dir: Path | str, shard_id: str) -> StoredShard:
    path = shards_dir(out_dir) / f"{check_shard_id(shard_id)}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardListError(f"shard {shard_id} has no path list at {path}") from None
    except ValueError as exc:
        raise ShardListError(f"{path} is damaged: {exc}") from None
    paths = data.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ShardListError(f"{path} holds no list of paths")
    return StoredShard(shard_id, paths, str(data.get("chain", "")))


def shard_paths(out_dir: Path | str, shard_id: str) -> list[str]:
    """The paths of `shard_id`: its own file, or its place among its ancestor's halves."""
    parts = check_shard_id(shard_id).split(".")
    for depth in range(len(parts), 0, -1):
        stored_id = ".".join(parts[:depth])
        if (shards_dir(out_dir) / f"{stored_id}.json").is_file():
            paths = read_stored(out_dir, stored_id).paths
            for half in parts[depth:]:
                paths = halves(paths)[int(half)]
            return paths
    raise ShardListError(f"shard {shard_id} has no path list under {shards_dir(out_dir)}")


def write_index(out_dir: Path | str, shard_size: int, shard_ids: list[str], images: int, chain: str) -> None:
    """The listing is complete: from now on the stored list is the run."""
    index = {"shard_size": shard_size, "shards": len(shard_ids), "images": images, "chain": chain,
             "first": shard_ids[0] if shard_ids else None, "last": shard_ids[-1] if shard_ids else None}  # fmt: skip
    data = (json.dumps(index) + "\n").encode()
    atomic_write(shards_dir(out_dir) / INDEX_FILE, lambda handle: handle.write(data))


def read_index(out_dir: Path | str) -> dict | None:
    try:
        return json.loads((shards_dir(out_dir) / INDEX_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def stored_root_shards(out_dir: Path | str) -> list[str]:
    """Root shard ids with a path list, in order (000000, 000001, ...)."""
    folder = shards_dir(out_dir)
    if not isinstance(folder, ObjectPath) and not folder.is_dir():
        return []
    ids = [p.stem for p in folder.glob("*.json") if p.name != INDEX_FILE and "." not in p.stem]
    return sorted(ids, key=shard_sort_key)


@dataclass
class CutShard:
    shard_id: str
    paths: list[str]
    stored: bool  # True: it was already in the list (a resumed enqueue); False: written now


def cut_shards(out_dir: Path | str, paths: Iterable[str], shard_size: int) -> Iterator[CutShard]:
    """Yield the run's shards, writing each new one's path list before it is yielded.

    A complete stored list is yielded as it is and `paths` is not read. A partial one (an
    interrupted enqueue) is checked against the start of `paths` and continued from there."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    index = read_index(out_dir)
    stored = stored_root_shards(out_dir)
    if index is not None:
        for shard_id in stored:
            yield CutShard(shard_id, read_stored(out_dir, shard_id).paths, True)
        return
    source = iter(paths)
    chain = GENESIS
    shard_ids: list[str] = []
    images = 0
    for position, shard_id in enumerate(stored):
        if shard_id != root_shard_id(position):
            raise ShardListError(f"{shards_dir(out_dir)}: shard {root_shard_id(position)} is missing")
        kept = read_stored(out_dir, shard_id)
        given = [next(source, None) for _ in range(len(kept.paths))]
        chain = chain_hash(chain, [p for p in given if p is not None])
        if chain != kept.chain:
            raise ShardListError(
                f"the inputs no longer list the same paths as the interrupted enqueue did (from shard "
                f"{shard_id} on): enqueue the same inputs again, or start a new run"
            )
        shard_ids.append(shard_id)
        images += len(kept.paths)
        yield CutShard(shard_id, kept.paths, True)
    batch: list[str] = []
    for path in source:
        batch.append(path)
        if len(batch) == shard_size:
            chain = _store_new(out_dir, len(shard_ids), batch, chain, shard_ids)
            images += len(batch)
            yield CutShard(shard_ids[-1], batch, False)
            batch = []
    if batch:
        chain = _store_new(out_dir, len(shard_ids), batch, chain, shard_ids)
        images += len(batch)
        yield CutShard(shard_ids[-1], batch, False)
    write_index(out_dir, shard_size, shard_ids, images, chain)


def _store_new(out_dir: Path | str, position: int, batch: list[str], chain: str, shard_ids: list[str]) -> str:
    shard_id = root_shard_id(position)
    chain = chain_hash(chain, batch)
    write_shard_paths(out_dir, shard_id, batch, chain)
    shard_ids.append(shard_id)
    return chain
