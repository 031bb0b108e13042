"""The done index against a plain set of (kind, name, version) triples, under random contents and
queries, including digests whose high halves collide (made by hand: BLAKE2b never gives one here)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.delta.done_index import CONTAINER, FILE, DoneIndex, digests

names = st.text(alphabet="ab/.é\0x", min_size=1, max_size=6)
versions = st.sampled_from(["1:1", "1:2", "etag:abc", "2:1"])
triples = st.tuples(st.sampled_from([FILE, CONTAINER]), names, versions)


def index_of(items: list[tuple[bytes, str, str]]) -> DoneIndex:
    parts = [digests(kind, [name], [version]) for kind, name, version in items]
    return DoneIndex.of(parts)


@settings(max_examples=200, deadline=None)
@given(done=st.lists(triples, max_size=30), asked=st.lists(triples, max_size=30))
def test_the_index_answers_as_a_set_does(done, asked) -> None:
    index = index_of(done)
    for kind, name, version in asked:
        high, low = digests(kind, [name], [version])
        assert bool(index.contains(high, low)[0]) == ((kind, name, version) in set(done))


@settings(max_examples=100, deadline=None)
@given(lows=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8, unique=True),
       probe=st.integers(0, 2**64 - 1))  # fmt: skip
def test_equal_high_halves_are_told_apart_by_the_low_ones(lows, probe) -> None:
    high = np.full(len(lows), 7, dtype=np.uint64)
    index = DoneIndex.of([(high, np.array(lows, dtype=np.uint64))])
    asked_low = np.array([*lows, probe], dtype=np.uint64)
    found = index.contains(np.full(len(asked_low), 7, dtype=np.uint64), asked_low)
    assert found[:-1].all()
    assert bool(found[-1]) == (probe in lows)
    assert not index.contains(np.array([8], np.uint64), np.array([lows[0]], np.uint64))[0]


def test_a_name_and_a_version_cannot_trade_characters() -> None:
    """("a", "b:c") and ("a\\0b", ...) must not digest alike: the separator is in neither field's
    usual alphabet, and the kind keeps files and containers apart."""
    a = digests(FILE, ["x", "x"], ["1:2", "1:3"])
    b = digests(CONTAINER, ["x"], ["1:2"])
    assert a[0][0] != a[0][1] and a[0][0] != b[0][0]
