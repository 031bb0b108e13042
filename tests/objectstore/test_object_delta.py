"""Incremental runs over a bucket against the real server: an object rewritten with new bytes gets
a new ETag and is labeled again, one rewritten with the same bytes keeps its ETag and is not, a
new one is labeled, and the rest are left out."""

from __future__ import annotations

import cv2
from click.testing import CliRunner
from objectstore_helpers import IMAGES_BUCKET, LABELS_BUCKET

from worker.cli import main
from worker.dataset.files import iter_records


def run(bundle, *args: str) -> str:
    result = CliRunner().invoke(main, ["run", *args, "--model", str(bundle), "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def test_rewritten_objects_are_labeled_again_by_their_etag(
    s3_admin, s3_prefix, labeler_s3_env, photos, tiny_bundle, tmp_path
) -> None:
    names = sorted(photos)[:3]
    encoded = {name: cv2.imencode(".jpg", photos[name][..., ::-1])[1].tobytes() for name in names}
    key = f"{IMAGES_BUCKET}/{s3_prefix}/photos"
    s3_admin.pipe({f"{key}/{name}.jpg": data for name, data in encoded.items()})
    prefix = f"s3://{key}/"
    run(tiny_bundle, prefix, "--out", f"{tmp_path / 'night1'}/")
    first = {row["path"]: row for row in iter_records(tmp_path / "night1")}
    assert len(first) == 3 and all(row["source_version"].startswith("etag:") for row in first.values())

    changed, same = names[0], names[1]
    s3_admin.pipe({
        f"{key}/{changed}.jpg": cv2.imencode(".jpg", photos[changed][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes(),
        f"{key}/{same}.jpg": encoded[same],  # rewritten, same bytes: the same ETag
        f"{key}/new.jpg": encoded[names[2]],
    })  # fmt: skip
    output = run(tiny_bundle, prefix, "--out", f"{tmp_path / 'night2'}/", "--skip-done-in", str(tmp_path / "night1"))
    second = {row["path"]: row for row in iter_records(tmp_path / "night2")}
    assert set(second) == {f"{prefix}{changed}.jpg", f"{prefix}new.jpg"}
    assert second[f"{prefix}{changed}.jpg"]["source_version"] != first[f"{prefix}{changed}.jpg"]["source_version"]
    assert "left out: 2 images" in output


def test_a_chain_of_datasets_in_a_bucket(s3_admin, s3_prefix, labeler_s3_env, photos, tiny_bundle, tmp_path) -> None:
    """Datasets written to and built on in a bucket: the lineage names URLs, the union reads them."""
    names = sorted(photos)[:2]
    key = f"{IMAGES_BUCKET}/{s3_prefix}/in"
    s3_admin.pipe({f"{key}/{name}.jpg": cv2.imencode(".jpg", photos[name][..., ::-1])[1].tobytes() for name in names})
    labels = f"s3://{LABELS_BUCKET}/{s3_prefix}"
    run(tiny_bundle, f"s3://{key}/", "--out", f"{labels}/night1/")
    s3_admin.pipe({f"{key}/new.jpg": cv2.imencode(".jpg", photos[names[0]][..., ::-1])[1].tobytes()})
    output = run(tiny_bundle, f"s3://{key}/", "--out", f"{labels}/night2/", "--skip-done-in", f"{labels}/night1/")
    assert "left out: 2 images" in output
    assert [row["path"] for row in iter_records(f"{labels}/night2")] == [f"s3://{key}/new.jpg"]
    union = tmp_path / "all.jsonl"
    result = CliRunner().invoke(main, ["results", f"{labels}/night2", "--with-lineage", "--out", str(union)])
    assert result.exit_code == 0, result.output
    assert len(union.read_text().splitlines()) == 3
