"""The shard list's pack files: container shards stored PACK_SIZE root ids to a file, mixed with
shards of loose paths, read back one by one, bisected, and resumed after a listing cut short at
any point (the stored list must go on exactly where it stopped, each entry once)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.dataset.shard_list import (
    PACK_SIZE,
    ShardListError,
    cut_shards,
    read_index,
    read_stored,
    shard_source,
    shards_dir,
    stored_root_shards,
)
from worker.sources.container import TAR, Container


def entries(kinds: list[bool]) -> list:
    """True: a tar; False: a loose path (shards of 3 paths)."""
    return [Container(TAR, f"/tars/{i:05d}.tar") if tar else f"/img/{i:05d}.jpg" for i, tar in enumerate(kinds)]


def expected_sources(items: list, shard_size: int) -> list:
    out, batch = [], []
    for item in items:
        if isinstance(item, Container):
            if batch:
                out.append(batch)
                batch = []
            out.append(item)
        else:
            batch.append(item)
            if len(batch) == shard_size:
                out.append(batch)
                batch = []
    return out + ([batch] if batch else [])


def test_a_thousand_tars_take_a_pack_file_per_group(tmp_path) -> None:
    items = entries([True] * 1000)
    cut = list(cut_shards(tmp_path, items, 3))
    assert [shard.source for shard in cut] == items
    files = sorted(p.name for p in shards_dir(tmp_path).iterdir())
    assert len(files) == -(-1000 // PACK_SIZE) + 1, files[:5]  # the packs and index.json
    assert read_stored(tmp_path, "000999").source == items[999]
    assert shard_source(tmp_path, "000070") == items[70]
    assert stored_root_shards(tmp_path) == [f"{i:06d}" for i in range(1000)]
    assert read_index(tmp_path)["shards"] == 1000
    with pytest.raises(ShardListError):
        read_stored(tmp_path, "001000")


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=200), stop_at=st.integers(0, 200))
def test_a_listing_cut_short_anywhere_resumes_to_the_same_list(tmp_path_factory, kinds, stop_at) -> None:
    out = tmp_path_factory.mktemp("packs")
    items = entries(kinds)
    first = []
    for shard in cut_shards(out, items, 3):  # the enqueue is killed after `stop_at` shards
        if len(first) == stop_at:
            break
        first.append(shard)
    assert read_index(out) is None or len(first) == len(expected_sources(items, 3))
    resumed = list(cut_shards(out, items, 3))
    want = expected_sources(items, 3)
    assert [shard.source for shard in resumed] == want
    assert [shard.shard_id for shard in resumed] == [f"{i:06d}" for i in range(len(want))]
    assert all(shard.stored for shard in resumed[: len(first)])
    assert [shard_source(out, f"{i:06d}") for i in range(len(want))] == want
    assert stored_root_shards(out) == [f"{i:06d}" for i in range(len(want))]
