"""A run's fixed shard list, stored with its output: `DIR/shards/<id>.json`, one file per shard.

The first enqueue of a run cuts its inputs into shards of `shard_size` paths, in input order, and
writes each shard's paths before the shard is published; `DIR/shards/index.json` is written when
the listing is complete. From then on the list is the run: enqueueing it again or resuming it
relabels only shards that are not done, and a directory whose listing changed meanwhile can make no
image labeled twice or skipped (new files need a new run). An enqueue killed mid-listing resumes
where it stopped, but only if the inputs still list the same paths up to there: each shard file
carries a hash chained over every path before and in it, checked on resume.

A container shard (one WebDataset tar or Parquet file of image bytes, or a range of one;
worker/sources/container.py) stores `{"container": {...}}` instead of paths: the list names the file,
never its samples, and is cut one container per shard. Consecutive container shards are stored
together, `PACK_SIZE` root ids to a file (`DIR/shards/pack-<group>.json`, group = root index //
PACK_SIZE), written once before any of them is yielded: a file per container made enqueueing
10,000 tars cost 10,000 durable file creations (~1 ms each on ext4), now ~160.

A bisected shard (`000123.1.0`) has no file of its own: its paths are halves of its parent's (a
container of unknown length gets its halves written when it is split, after its samples are counted).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.dataset.atomic import atomic_write, ensure_dir
from worker.dataset.files import check_shard_id, shard_sort_key
from worker.dataset.object_path import Location, LocationLike, ObjectPath, as_location
from worker.sources.container import Container, ContainerError

# What one shard reads: a list of paths (loose files or objects), or one container (range).
ShardSource = list[str] | Container
Entry = str | Container  # one input: a loose path, or a container

SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
PACK_SIZE = 64  # root ids per pack file of container shards
ROOT_ID_DIGITS = 6
GENESIS = "0" * 64


class ShardListError(ValueError):
    """The stored shard list and what an enqueue was given disagree, or the list is damaged."""


def shards_dir(out_dir: LocationLike) -> Location:
    return as_location(out_dir) / SHARDS_DIR


def root_shard_id(index: int) -> str:
    return f"{index:0{ROOT_ID_DIGITS}d}"


def children(shard_id: str) -> tuple[str, str]:
    """The two halves of a bisected shard."""
    return f"{shard_id}.0", f"{shard_id}.1"


def halves(source: ShardSource) -> tuple[ShardSource, ShardSource]:
    """The two halves of a shard's paths, or of a container range of known length."""
    if isinstance(source, Container):
        end = source.stop if source.stop is not None else source.start + (source.samples or 0)
        if end - source.start < 2:
            raise ShardListError(f"{source.url}: a container range of unknown or single length has no halves")
        middle = (source.start + end) // 2
        # the second half keeps an open end: a damaged tar's last row (after its counted samples) stays in it
        return (source.ranged(source.start, middle, source.offset, middle - source.start),
                source.ranged(middle, source.stop, 0, end - middle))  # fmt: skip
    middle = len(source) // 2
    return source[:middle], source[middle:]


def size_of(source: ShardSource) -> int:
    """Images in the shard where known without reading it (0: a container not counted yet)."""
    if isinstance(source, Container):
        return source.samples if source.samples is not None else (0 if source.stop is None else source.stop - source.start)
    return len(source)


def entry_text(entry: Entry) -> str:
    """One string per input entry: what deduplication and the listing hash see."""
    return entry.identity() if isinstance(entry, Container) else entry


def chain_hash(previous: str, entries: Iterable[Entry]) -> str:
    """The listing hash after `entries`, continuing from `previous`."""
    digest = hashlib.sha256(previous.encode("ascii"))
    for entry in entries:
        digest.update(entry_text(entry).encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredShard:
    shard_id: str
    source: ShardSource
    chain: str

    @property
    def entries(self) -> list[Entry]:
        return [self.source] if isinstance(self.source, Container) else list(self.source)


def _body(shard_id: str, source: ShardSource, chain: str) -> dict:
    body: dict = {"shard": shard_id, "chain": chain}
    if isinstance(source, Container):
        body["container"] = source.to_json()
    else:
        body["paths"] = source
    return body


def _write_json(path: Location, body: dict) -> None:
    """One shard-list file, durably (create, fsync, rename, fsync of the folder)."""
    ensure_dir(path.parent)
    data = json.dumps(body, ensure_ascii=False).encode()
    atomic_write(path, lambda handle: handle.write(data))


def write_shard_source(out_dir: Path | str, shard_id: str, source: ShardSource, chain: str) -> None:
    _write_json(shards_dir(out_dir) / f"{check_shard_id(shard_id)}.json", _body(shard_id, source, chain))


def pack_path(out_dir: Path | str, group: int) -> Location:
    return shards_dir(out_dir) / f"pack-{group:0{ROOT_ID_DIGITS}d}.json"


def _group_of(shard_id: str) -> int:
    return int(shard_id) // PACK_SIZE


def _read_json(path: Location) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ShardListError(f"{path} is damaged: {exc}") from None


def _packed(out_dir: Path | str, shard_id: str) -> dict | None:
    """A root shard's entry in its group's pack file, or None."""
    if not shard_id.isdigit():
        return None
    return _pack_entries(pack_path(out_dir, _group_of(shard_id))).get(shard_id)


def _pack_entries(path: Location) -> dict[str, dict]:
    """A pack file's entries by shard id (empty: no such pack)."""
    return {str(entry.get("shard")): entry for entry in (_read_json(path) or {}).get("shards", [])}


def _stored_entry(out_dir: Path | str, shard_id: str) -> dict | None:
    """A shard's stored entry: its own file, else (a root shard) its group's pack; None: neither."""
    data = _read_json(shards_dir(out_dir) / f"{check_shard_id(shard_id)}.json")
    return data if data is not None else _packed(out_dir, shard_id)


def _parse(shard_id: str, data: dict, where: Location) -> StoredShard:
    if "container" in data:
        try:
            return StoredShard(shard_id, Container.from_json(data["container"]), str(data.get("chain", "")))
        except ContainerError as exc:
            raise ShardListError(f"{where}: {exc}") from None
    paths = data.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ShardListError(f"{where} holds no list of paths")
    return StoredShard(shard_id, paths, str(data.get("chain", "")))


def read_stored(out_dir: Path | str, shard_id: str) -> StoredShard:
    path = shards_dir(out_dir) / f"{check_shard_id(shard_id)}.json"
    data = _stored_entry(out_dir, shard_id)
    if data is None:
        raise ShardListError(f"shard {shard_id} has no path list at {path}")
    return _parse(shard_id, data, path)


def shard_source(out_dir: Path | str, shard_id: str) -> ShardSource:
    """What `shard_id` reads: its own file, or its place among its ancestor's halves."""
    parts = check_shard_id(shard_id).split(".")
    for depth in range(len(parts), 0, -1):
        stored_id = ".".join(parts[:depth])
        data = _stored_entry(out_dir, stored_id)  # one read (a pack's, for a packed root), not a probe and a read
        if data is not None:
            source = _parse(stored_id, data, shards_dir(out_dir) / f"{stored_id}.json").source
            for half in parts[depth:]:
                source = halves(source)[int(half)]
            return source
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
    return sorted(_root_entries(out_dir), key=shard_sort_key)


def _root_entries(out_dir: Path | str) -> dict[str, dict | None]:
    """Every stored root shard id: packed ones with their entry (each pack read once), those with
    a file of their own with None (read when wanted)."""
    folder = shards_dir(out_dir)
    if not isinstance(folder, ObjectPath) and not folder.is_dir():
        return {}
    found: dict[str, dict | None] = {}
    for path in folder.glob("*.json"):
        if path.stem.isdigit():  # not index.json, lineage.json, halves
            found[path.stem] = None
        elif path.name.startswith("pack-"):
            found.update(_pack_entries(path))
    return found


def _read_root(out_dir: Path | str, shard_id: str, entries: dict[str, dict | None]) -> StoredShard:
    """A root shard of `_root_entries`: a packed one from the entry in hand, else its own file."""
    entry = entries.get(shard_id)
    if entry is None:
        return read_stored(out_dir, shard_id)
    return _parse(shard_id, entry, pack_path(out_dir, _group_of(shard_id)))


@dataclass
class CutShard:
    shard_id: str
    source: ShardSource
    stored: bool  # True: it was already in the list (a resumed enqueue); False: written now

    @property
    def size(self) -> int:
        return size_of(self.source)


def cut_shards(out_dir: Path | str, entries: Iterable[Entry], shard_size: int) -> Iterator[CutShard]:
    """Yield the run's shards, writing each new one's list before it is yielded: up to
    `shard_size` loose paths per shard, and each container on its own.

    A complete stored list is yielded as it is and `entries` is not read. A partial one (an
    interrupted enqueue) is checked against the start of `entries` and continued from there."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    index = read_index(out_dir)
    entries_found = _root_entries(out_dir)
    stored = sorted(entries_found, key=shard_sort_key)
    if index is not None:
        for shard_id in stored:
            yield CutShard(shard_id, _read_root(out_dir, shard_id, entries_found).source, True)
        return
    source = iter(entries)
    chain = GENESIS
    shard_ids: list[str] = []
    images = 0
    for position, shard_id in enumerate(stored):
        if shard_id != root_shard_id(position):
            raise ShardListError(f"{shards_dir(out_dir)}: shard {root_shard_id(position)} is missing")
        kept = _read_root(out_dir, shard_id, entries_found)
        given = [next(source, None) for _ in range(len(kept.entries))]
        chain = chain_hash(chain, [p for p in given if p is not None])
        if chain != kept.chain:
            raise ShardListError(
                f"the inputs no longer list the same paths as the interrupted enqueue did (from shard "
                f"{shard_id} on): enqueue the same inputs again, or start a new run"
            )
        shard_ids.append(shard_id)
        images += size_of(kept.source)
        yield CutShard(shard_id, kept.source, True)
    batch: list[str] = []
    packing = _Packer(out_dir, shard_ids, chain)
    for entry in source:
        if isinstance(entry, Container):
            if batch:
                yield from packing.flush()
                yield packing.store_paths(batch)
                images += len(batch)
                batch = []
            images += size_of(entry)
            yield from packing.add(entry)
            continue
        batch.append(entry)
        if len(batch) == shard_size:
            yield from packing.flush()
            yield packing.store_paths(batch)
            images += len(batch)
            batch = []
    yield from packing.flush()
    if batch:
        yield packing.store_paths(batch)
        images += len(batch)
    write_index(out_dir, shard_size, shard_ids, images, packing.chain)


class _Packer:
    """Container shards of a listing, held until their group's pack file is written (a group
    ends at a multiple of PACK_SIZE root ids, or where a shard of loose paths comes between)."""

    def __init__(self, out_dir: Path | str, shard_ids: list[str], chain: str) -> None:
        self.out_dir, self.shard_ids, self.chain = out_dir, shard_ids, chain
        self.held: list[tuple[str, Container, str]] = []

    def add(self, container: Container) -> Iterator[CutShard]:
        shard_id = root_shard_id(len(self.shard_ids))
        self.chain = chain_hash(self.chain, [container])
        self.shard_ids.append(shard_id)
        self.held.append((shard_id, container, self.chain))
        if (len(self.shard_ids)) % PACK_SIZE == 0:
            yield from self.flush()

    def store_paths(self, paths: list[str]) -> CutShard:
        """A shard of loose paths: its own file, written before it is yielded (after any held
        containers were flushed: ids and the chain go in input order)."""
        shard_id = root_shard_id(len(self.shard_ids))
        self.chain = chain_hash(self.chain, paths)
        write_shard_source(self.out_dir, shard_id, paths, self.chain)
        self.shard_ids.append(shard_id)
        return CutShard(shard_id, paths, False)

    def flush(self) -> Iterator[CutShard]:
        """Write the held shards' group (with what an earlier flush stored in it), then yield them."""
        if not self.held:
            return
        group = _group_of(self.held[0][0])
        path = pack_path(self.out_dir, group)
        kept = list(_pack_entries(path).values())
        entries = kept + [_body(shard_id, container, chain) for shard_id, container, chain in self.held]
        _write_json(path, {"group": group, "shards": entries})
        held, self.held = self.held, []
        for shard_id, container, _chain in held:
            yield CutShard(shard_id, container, False)
