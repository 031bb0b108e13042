"""Incremental runs (`labeler run --skip-done-in`): a nightly chain over a folder whose files change
(mtime, size), appear, vanish and fail; tar shards kept and replaced; a rebuilt model; the union read
back with the newest row per path; and the mistakes a user makes with the new flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.dataset.files import iter_batches, iter_records
from worker.dataset.schema import batch_to_records
from worker.delta.lineage import LINEAGE_FILE

wds = pytest.importorskip("webdataset")


def invoke(*args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == expect, result.output
    return result.output


def run(bundle: Path, *args: str, expect: int = 0) -> str:
    return invoke("run", *args, "--model", str(bundle), "--threads", "1", "--decode-threads", "1", "--no-progress",
                  expect=expect)  # fmt: skip


def rows(out: Path) -> dict[str, dict]:
    found = list(iter_records(out))
    by_path = {row["path"]: row for row in found}
    assert len(by_path) == len(found), "a path has two rows in one dataset"
    return by_path


def jpeg(photo, size: int, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", cv2.resize(photo[..., ::-1], (size, size)), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


@pytest.fixture
def folder(tmp_path, photos) -> Path:
    """Four photos and one file that is not an image (its row is an error)."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(sorted(photos)[:4]):
        (images / f"{'abcd'[i]}.jpg").write_bytes(jpeg(photos[name], 64 + 8 * i))
    (images / "e.jpg").write_bytes(b"not a jpeg at all")
    return images


def labeled_versions(*datasets: Path) -> list[tuple[str, str]]:
    """(path, source_version) of every label row of the datasets: none may repeat in a chain."""
    pairs = []
    for out in datasets:
        for batch in iter_batches(out, columns=["path", "source_version", "error_code"]):
            for path, version, code in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                if code is None:
                    pairs.append((path, version))
    return pairs


def test_a_nightly_chain_labels_only_what_is_new_or_changed(tmp_path, folder, photos, tiny_bundle) -> None:
    night1, night2, night3, night4 = (tmp_path / f"night{i}" for i in range(1, 5))
    run(tiny_bundle, str(folder), "--out", f"{night1}/")
    first = rows(night1)
    assert len(first) == 5 and first[str(folder / "e.jpg")]["error"]["code"] == "decode_failed"
    assert all(row["source_version"] == f"{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p, row in first.items())

    b, c, d = folder / "b.jpg", folder / "c.jpg", folder / "d.jpg"
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    c.write_bytes(jpeg(photos[sorted(photos)[0]], 100))  # new bytes, new size
    d.unlink()
    (folder / "f.jpg").write_bytes(jpeg(photos[sorted(photos)[1]], 72))
    output = run(tiny_bundle, str(folder), "--out", f"{night2}/", "--skip-done-in", str(night1))
    second = rows(night2)
    assert set(second) == {str(folder / name) for name in ("b.jpg", "c.jpg", "e.jpg", "f.jpg")}, "a.jpg is unchanged"
    assert "left out: 1 images" in output
    manifest = json.loads((night2 / "manifest.json").read_text())
    assert [entry["location"] for entry in manifest["lineage"]] == [str(night1)]

    output = run(tiny_bundle, str(folder), "--out", f"{night3}/", "--skip-done-in", str(night2))
    assert set(rows(night3)) == {str(folder / "e.jpg")}, "only the error row is tried again"
    assert "left out: 4 images" in output, "night 1's a.jpg through the lineage of night 2"
    lineage = json.loads((night3 / "manifest.json").read_text())["lineage"]
    assert [(e["location"], e["named"]) for e in lineage] == [(str(night2), True), (str(night1), False)]

    run(tiny_bundle, str(folder), "--out", f"{night4}/", "--skip-done-in", str(night3), "--skip-failed")
    assert rows(night4) == {}, "--skip-failed: the unchanged bad file is not tried again"

    pairs = labeled_versions(night1, night2, night3, night4)
    assert len(pairs) == len(set(pairs)), "a path is labeled once per version across the chain"

    union = tmp_path / "union.jsonl"
    invoke("results", str(night4), "--with-lineage", "--out", str(union))
    merged = [json.loads(line) for line in union.read_text().splitlines()]
    by_path = {row["path"]: row for row in merged}
    assert len(merged) == len(by_path) == 6, "one row per image that was ever labeled (d.jpg kept from night 1)"
    assert by_path[str(c)]["source_version"] == f"{c.stat().st_size}:{c.stat().st_mtime_ns}", "the newest row wins"
    assert by_path[str(folder / "e.jpg")]["error"]["code"] == "decode_failed"

    table = tmp_path / "union.parquet"  # the same rows, in the datasets' own schema
    invoke("results", str(night4), "--with-lineage", "--out", str(table))
    assert pq.read_schema(table).equals(pq.read_schema(next((night1 / "labels").glob("*.parquet"))), check_metadata=True)
    assert [record for batch in pq.read_table(table).to_batches() for record in batch_to_records(batch)] == merged


def test_a_rebuilt_model_relabels_everything(tmp_path, folder, tiny_bundle) -> None:
    from engine_build.build import build_from_weights
    from engine_build.weights import random_weights

    rebuilt = tmp_path / "rebuilt"
    build_from_weights(random_weights(10, seed=2, base_width=8), rebuilt)
    run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'old'}/")
    output = run(rebuilt, str(folder), "--out", f"{tmp_path / 'new'}/", "--skip-done-in", str(tmp_path / "old"))
    assert len(rows(tmp_path / "new")) == 5
    assert "none of its rows count as done" in output


def test_a_tar_shard_is_skipped_whole_until_it_is_replaced(tmp_path, photos, tiny_bundle) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    names = sorted(photos)

    def write_tar(index: int, size: int) -> Path:
        path = shards / f"{index:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for key in range(3):
                sink.write({"__key__": f"{index:05d}{key:04d}", "jpg": jpeg(photos[names[key]], size)})
        return path

    first, second = write_tar(0, 64), write_tar(1, 64)
    run(tiny_bundle, str(shards), "--out", f"{tmp_path / 'night1'}/")
    assert len(rows(tmp_path / "night1")) == 6
    write_tar(1, 80)  # img2dataset re-downloaded shard 1: new bytes
    output = run(tiny_bundle, str(shards), "--out", f"{tmp_path / 'night2'}/", "--skip-done-in", str(tmp_path / "night1"))
    again = rows(tmp_path / "night2")
    assert {row["source_url"] for row in again.values()} == {str(second)}, f"{first} is unchanged: skipped whole"
    assert len(again) == 3 and "1 container shards" in output


def test_a_resume_keeps_the_chain_it_started_with(tmp_path, folder, tiny_bundle) -> None:
    run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'a'}/")
    run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'b'}/")
    out = tmp_path / "c"
    run(tiny_bundle, str(folder), "--out", f"{out}/", "--skip-done-in", str(tmp_path / "a"))
    assert (out / "shards" / LINEAGE_FILE).is_file()
    output = run(tiny_bundle, str(folder), "--out", f"{out}/", "--resume", "--skip-done-in", str(tmp_path / "b"), expect=1)
    assert "was started on --skip-done-in" in output
    run(tiny_bundle, str(folder), "--out", f"{out}/", "--resume")  # naming none: the stored chain
    output = run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'b'}/", "--resume", "--skip-done-in",
                 str(tmp_path / "a"), expect=1)  # fmt: skip
    assert "was started without --skip-done-in" in output
    assert not (tmp_path / "b" / "shards" / LINEAGE_FILE).exists(), "a run on nothing stores no lineage"


def test_the_mistakes_a_user_makes_get_one_clear_line(tmp_path, folder, tiny_bundle) -> None:
    done = tmp_path / "done"
    run(tiny_bundle, str(folder), "--out", f"{done}/")
    output = run(tiny_bundle, str(folder), "--out", str(tmp_path / "x.jsonl"), "--skip-done-in", str(done), expect=2)
    assert "need --out DIR/" in output
    output = run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'y'}/", "--skip-failed", expect=2)
    assert "goes with --skip-done-in" in output
    output = run(tiny_bundle, str(folder), "--out", f"{done}/", "--resume", "--skip-done-in", str(done), expect=1)
    assert "this run's own --out" in output
    unfinished = tmp_path / "unfinished"
    (unfinished / "labels").mkdir(parents=True)
    output = run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'z'}/", "--skip-done-in", str(unfinished), expect=1)
    assert "no manifest.json" in output and "Traceback" not in output
    output = run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'w'}/", "--skip-done-in", str(tmp_path / "nowhere"), expect=1)
    assert "no manifest.json" in output
    assert not (tmp_path / "w").exists() and not (tmp_path / "z").exists(), "nothing written for a refused run"


def test_a_parquet_file_of_images_is_skipped_whole_until_it_is_rewritten(tmp_path, photos, tiny_bundle) -> None:
    """img2dataset's Parquet layout (a `key` and a `jpg` binary column): the file is the unit, as a tar is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(photos)
    folder = tmp_path / "parquet"
    folder.mkdir()

    def write(index: int, size: int) -> Path:
        path = folder / f"{index:05d}.parquet"
        keys = [f"{index:05d}{i:04d}" for i in range(3)]
        pq.write_table(pa.table({"key": keys, "jpg": [jpeg(photos[names[i]], size) for i in range(3)]}), path)
        return path

    write(0, 64)
    second = write(1, 64)
    run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'night1'}/")
    assert len(rows(tmp_path / "night1")) == 6
    output = run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'night2'}/", "--skip-done-in", str(tmp_path / "night1"))
    assert rows(tmp_path / "night2") == {} and "2 container shards" in output
    write(1, 72)
    run(tiny_bundle, str(folder), "--out", f"{tmp_path / 'night3'}/", "--skip-done-in", str(tmp_path / "night2"))
    assert {row["source_url"] for row in rows(tmp_path / "night3").values()} == {str(second)}


def test_results_of_a_folder_that_is_no_dataset_is_an_error_not_an_empty_file(tmp_path, folder) -> None:
    output = invoke("results", str(folder), "--out", str(tmp_path / "x.jsonl"), expect=1)
    assert "not a labeler dataset" in output and not (tmp_path / "x.jsonl").exists()
