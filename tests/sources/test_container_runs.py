"""`labeler run` on the formats fleets keep images in, written by the field's own tools: WebDataset
tar shards (webdataset's ShardWriter, in img2dataset's layout), a Hub Parquet file (Hugging Face
`datasets`) and img2dataset's Parquet layout. Labels equal those of the same images as loose
files; every sample gets one row, bad ones their own code, and nothing else stops; ranges, brace
notation, lists, resume and --retry-errors work on container shards."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.dataset.files import iter_records, shard_files
from worker.dataset.shard_list import read_stored, stored_root_shards

wds = pytest.importorskip("webdataset")

SAMPLES_PER_TAR = 5


def invoke(*args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == expect, result.output
    return result.output


def run_args(bundle: Path, *args: str) -> list[str]:
    return ["run", *args, "--model", str(bundle), "--threads", "1", "--decode-threads", "1", "--no-progress"]


def rows_by_path(out: Path) -> dict[str, dict]:
    rows = list(iter_records(out))
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path has two rows"
    return by_path


def assert_same_labels(row: dict, loose: dict) -> None:
    """Same bytes, same model: the same top-1 up to near-ties (batches differ), scores within 1e-4."""
    assert "labels" in row and "labels" in loose, (row, loose)
    mine, theirs = row["labels"], loose["labels"]
    assert abs(mine[0]["score"] - theirs[0]["score"]) < 1e-4
    if mine[0]["index"] != theirs[0]["index"]:
        assert abs(theirs[0]["score"] - theirs[1]["score"]) < 1e-4, "top-1 differs beyond a near-tie"


@pytest.fixture(scope="module")
def jpegs(photos) -> dict[str, bytes]:
    """Twelve small JPEGs: crops of the test photographs."""
    images = {}
    names = sorted(photos)
    for i in range(12):
        photo = photos[names[i % len(names)]]
        y, x = (i * 17) % (photo.shape[0] - 96), (i * 29) % (photo.shape[1] - 96)
        ok, data = cv2.imencode(".jpg", photo[y : y + 96, x : x + 96, ::-1].copy())
        assert ok
        images[f"{i:09d}"] = data.tobytes()
    return images


@pytest.fixture(scope="module")
def loose(tmp_path_factory, jpegs, tiny_bundle) -> dict[str, dict]:
    """The images as loose files, labeled: key -> row."""
    folder = tmp_path_factory.mktemp("loose")
    for key, data in jpegs.items():
        (folder / f"{key}.jpg").write_bytes(data)
    out = tmp_path_factory.mktemp("loose-out") / "ds"
    invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/"))
    return {Path(path).stem: row for path, row in rows_by_path(out).items()}


def img2dataset_folder(folder: Path, jpegs: dict[str, bytes]) -> list[Path]:
    """img2dataset's webdataset output: NNNNN.tar (jpg, txt, json per sample) written by webdataset's
    ShardWriter, a metadata NNNNN.parquet beside each, and NNNNN_stats.json written last."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(jpegs)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=SAMPLES_PER_TAR, verbose=0) as sink:
        for key in keys:
            sink.write({"__key__": key, "jpg": jpegs[key], "txt": f"caption {key}",
                        "json": json.dumps({"key": key}).encode()})  # fmt: skip
    tars = sorted(folder.glob("*.tar"))
    for shard in range(len(tars)):
        mine = keys[shard * SAMPLES_PER_TAR : (shard + 1) * SAMPLES_PER_TAR]
        pq.write_table(pa.table({"key": mine, "url": [f"https://example.com/{k}.jpg" for k in mine],
                                 "caption": [f"caption {k}" for k in mine], "status": ["success"] * len(mine)}),
                       folder / f"{shard:05d}.parquet")  # fmt: skip
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(mine)}))
    return tars


def test_an_img2dataset_folder_is_labeled_as_its_loose_images_are(tmp_path, jpegs, loose, tiny_bundle) -> None:
    folder = tmp_path / "laion"
    tars = img2dataset_folder(folder, jpegs)
    assert len(tars) == 3
    out = tmp_path / "labels"
    invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/"))
    rows = rows_by_path(out)
    assert len(rows) == len(jpegs)
    assert len(shard_files(out)) == len(tars)  # one labeler shard per tar; the sidecars are not inputs
    for path, row in rows.items():
        url, key = path.split("#")
        assert row["source_url"] == url and row["source_key"] == key and url.endswith(".tar")
        assert_same_labels(row, loose[key])
    assert [row["source_row"] for row in rows.values()] == [i % SAMPLES_PER_TAR for i in range(len(jpegs))]
    stored = read_stored(out, stored_root_shards(out)[0])
    assert stored.source.url == str(tars[0])  # the shard list names the tar, not its samples
    joined = duckdb.sql(
        f"SELECT m.url, l.top1_label FROM '{out}/labels/*.parquet' l JOIN '{folder}/*.parquet' m ON m.key = l.source_key"
    ).fetchall()
    assert len(joined) == len(jpegs)


def test_brace_notation_lists_and_ranges_give_the_same_rows(tmp_path, jpegs, tiny_bundle) -> None:
    folder = tmp_path / "shards"
    img2dataset_folder(folder, jpegs)
    whole = tmp_path / "whole"
    invoke(*run_args(tiny_bundle, str(folder / "{00000..00002}.tar"), "--out", f"{whole}/"))
    listing = tmp_path / "tars.txt"
    listing.write_text("".join(f"{folder}/{i:05d}.tar\n" for i in range(3)))
    ranged = tmp_path / "ranged"
    invoke(*run_args(tiny_bundle, f"@{listing}", str(folder / "00001.tar"), "--samples-per-shard", "2",
                     "--out", f"{ranged}/"))  # fmt: skip
    assert len(shard_files(ranged)) == 3 + 3 + 1  # 5, 5 and 2 samples cut into ranges of 2; the tar named twice once
    first_range = read_stored(ranged, "000001").source
    assert (first_range.start, first_range.stop) == (2, 4) and first_range.offset > 0
    a, b = rows_by_path(whole), rows_by_path(ranged)
    assert sorted(a) == sorted(b) and len(a) == len(jpegs)
    for path in a:
        assert a[path]["source_row"] == b[path]["source_row"]
        assert_same_labels(b[path], a[path])


def test_hub_and_img2dataset_parquet_files_are_labeled_as_their_loose_images(
    tmp_path, jpegs, loose, tiny_bundle, monkeypatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    keys = sorted(jpegs)
    hub = tmp_path / "hub" / "train-00000-of-00001.parquet"
    hub.parent.mkdir()
    table = datasets.Dataset.from_dict({"image": [{"bytes": jpegs[k], "path": f"{k}.jpg"} for k in keys],
                                        "label": [i % 2 for i in range(len(keys))]})  # fmt: skip
    table = table.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    table.to_parquet(str(hub), batch_size=5)
    i2d = tmp_path / "i2d" / "00000.parquet"
    i2d.parent.mkdir()
    pq.write_table(pa.table({"key": keys, "jpg": [jpegs[k] for k in keys], "caption": ["x"] * len(keys)}), i2d,
                   row_group_size=4)  # fmt: skip
    out = tmp_path / "labels"
    invoke(*run_args(tiny_bundle, str(hub), str(i2d), "--out", f"{out}/"))
    rows = rows_by_path(out)
    assert len(rows) == 2 * len(keys)
    for i, key in enumerate(keys):
        assert_same_labels(rows[f"{hub}#{i}"], loose[key])  # no key column: the row number
        assert rows[f"{hub}#{i}"]["source_row"] == i and "source_key" not in rows[f"{hub}#{i}"]
        assert_same_labels(rows[f"{i2d}#{key}"], loose[key])
        assert rows[f"{i2d}#{key}"]["source_key"] == key
    assert b"huggingface" in pq.read_schema(hub).metadata  # the Hub's own class names stay in its file


def test_bad_shards_give_one_row_each_with_its_code_and_nothing_else_stops(tmp_path, jpegs, tiny_bundle) -> None:
    keys = sorted(jpegs)
    folder = tmp_path / "bad"
    folder.mkdir()
    big = cv2.imencode(".png", cv2.resize(cv2.imdecode(np.frombuffer(jpegs[keys[0]], np.uint8), cv2.IMREAD_COLOR), (400, 400)))[1].tobytes()
    cap = max(len(data) for data in jpegs.values()) + 1000
    assert len(big) > cap
    with wds.TarWriter(str(folder / "a.tar")) as sink:
        sink.write({"__key__": "good", "jpg": jpegs[keys[1]]})
        sink.write({"__key__": "big", "png": big})  # over --max-bytes
        sink.write({"__key__": "text", "jpg": b"not an image at all"})  # an image extension, no image
        sink.write({"__key__": "caption-only", "txt": b"no image member"})
        sink.write({"__key__": "other", "jpg": jpegs[keys[2]]})
        sink.write({"__key__": "good", "jpg": jpegs[keys[3]]})  # the key again, not adjacent
    with wds.TarWriter(str(folder / "cut.tar")) as sink:
        for key in keys[:4]:
            sink.write({"__key__": key, "jpg": jpegs[key]})
    cut_bytes = (folder / "cut.tar").read_bytes()
    third = _data_offsets(folder / "cut.tar")[2]  # the third sample's image bytes
    (folder / "cut.tar").write_bytes(cut_bytes[: third + 100])  # ends inside the third image
    pq.write_table(pa.table({"key": ["n0", "n1"], "jpg": pa.array([jpegs[keys[4]], None], pa.binary())}),
                   folder / "nulls.parquet")  # fmt: skip
    out = tmp_path / "labels"
    invoke(*run_args(tiny_bundle, str(folder / "a.tar"), str(folder / "cut.tar"), str(folder / "nulls.parquet"),
                     str(folder / "missing.tar"), "--max-bytes", str(cap), "--out", f"{out}/"))  # fmt: skip
    rows = rows_by_path(out)
    codes = {path.split(str(folder) + "/")[1]: row.get("error", {}).get("code") for path, row in rows.items()}
    assert codes == {
        "a.tar#good": None,
        "a.tar#big": "too_large",
        "a.tar#text": "decode_failed",
        "a.tar#caption-only": "no_image",
        "a.tar#other": None,
        "a.tar#good#5": "duplicate_key",
        f"cut.tar#{keys[0]}": None,
        f"cut.tar#{keys[1]}": None,
        f"cut.tar#{keys[2]}": "truncated",
        "nulls.parquet#n0": None,
        "nulls.parquet#n1": "no_image",
        "missing.tar": "not_found",
    }


def test_a_column_of_the_wrong_type_fails_its_rows_not_the_run(tmp_path, jpegs, tiny_bundle) -> None:
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [1, 2, 3]}), path)
    out = tmp_path / "labels"
    invoke(*run_args(tiny_bundle, str(path), "--image-column", "jpg", "--out", f"{out}/"))
    assert {row["error"]["code"] for row in rows_by_path(out).values()} == {"bad_column"}
    assert len(rows_by_path(out)) == 3
    neither = tmp_path / "neither.parquet"
    pq.write_table(pa.table({"name": ["a"], "size": [1]}), neither)
    output = invoke(*run_args(tiny_bundle, str(neither), "--out", f"{tmp_path}/other/"), expect=1)
    assert "--image-column" in output and "Traceback" not in output


def test_resume_and_retry_errors_work_on_container_shards(tmp_path, jpegs, tiny_bundle) -> None:
    folder = tmp_path / "shards"
    tars = img2dataset_folder(folder, jpegs)
    out = tmp_path / "labels"
    first = tars[0].read_bytes()
    tars[0].write_bytes(first[: len(first) // 2])  # a partial copy: truncated rows
    invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/"))
    before = rows_by_path(out)
    assert any(row.get("error", {}).get("code") == "truncated" for row in before.values())
    again = invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/", "--resume"))
    assert "skipped (already done) " in again
    tars[0].write_bytes(first)  # the copy finished
    invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/", "--retry-errors"))
    after = rows_by_path(out)
    assert len(after) == len(jpegs) and not any("error" in row for row in after.values())
    assert {p for p in before if "#@" not in p} <= set(after)


def test_jsonl_output_takes_container_samples_too(tmp_path, jpegs, tiny_bundle) -> None:
    folder = tmp_path / "shards"
    img2dataset_folder(folder, jpegs)
    out = tmp_path / "labels.jsonl"
    invoke(*run_args(tiny_bundle, str(folder), "--out", str(out)))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(jpegs) and all(line["source_key"] in jpegs for line in lines)
    invoke(*run_args(tiny_bundle, str(folder), "--out", str(out), "--resume"))
    assert len(out.read_text().splitlines()) == len(jpegs)


def _data_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as archive:
        return [member.offset_data for member in archive.getmembers()]


def test_a_folder_that_cannot_be_read_or_written_is_one_line(tmp_path, jpegs, tiny_bundle) -> None:
    folder = tmp_path / "shards"
    img2dataset_folder(folder, jpegs)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = invoke(*run_args(tiny_bundle, str(folder), "--out", f"{blocker}/sub/"), expect=1)
    assert "is a file, not a folder" in output
    if os.geteuid() != 0:  # root reads anything
        unreadable = folder / "00000.tar"
        unreadable.chmod(0)
        out = tmp_path / "labels"
        invoke(*run_args(tiny_bundle, str(folder), "--out", f"{out}/"))
        assert rows_by_path(out)[str(unreadable)]["error"]["code"] == "permission_denied"


def test_a_key_repeated_across_ranges_of_one_tar_gets_one_label_row(tmp_path, jpegs, tiny_bundle) -> None:
    """Ranges read from their own offsets never saw the key's first sample: the enqueue's header
    walk finds the repeats and hands each range its own, so the dataset keeps one row per path."""
    keys = sorted(jpegs)
    tar = tmp_path / "repeats.tar"
    with wds.TarWriter(str(tar)) as sink:
        for i in range(8):
            key = "again" if i in (1, 6) else keys[i]
            sink.write({"__key__": key, "jpg": jpegs[keys[i]]})
    out = tmp_path / "labels"
    invoke(*run_args(tiny_bundle, str(tar), "--samples-per-shard", "3", "--out", f"{out}/"))
    assert len(stored_root_shards(out)) == 3, "cut into three ranges"
    rows = rows_by_path(out)
    assert len(rows) == 8
    assert "labels" in rows[f"{tar}#again"]
    assert rows[f"{tar}#again#6"]["error"]["code"] == "duplicate_key"
