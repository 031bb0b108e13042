"""`labeler run` end to end: a thousand images, every input form, resume after a kill, embeddings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.local.results import completed_paths

IMAGE_COUNT = 1200


@pytest.fixture(scope="module")
def many_images(tmp_path_factory, photos) -> Path:
    """1,200 real-photo crops of varied sizes in nested folders (plus a non-image file to skip)."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    sources = [photo[..., ::-1] for photo in photos.values()]
    for index in range(IMAGE_COUNT):
        source = sources[index % len(sources)]
        h, w = source.shape[:2]
        size = int(rng.integers(96, 200))
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        folder = root / f"part{index % 7}" / f"sub{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        ext = ".png" if index % 10 == 0 else ".jpg"
        cv2.imwrite(
            str(folder / f"img{index:05d}{ext}"), np.ascontiguousarray(source[y : y + size, x : x + size])
        )
    (root / "part0" / "notes.txt").write_text("not an image, and not picked up from a directory walk")
    return root


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_labels_a_thousand_images_from_a_directory_exactly_once(many_images, tiny_bundle, tmp_path):
    out = tmp_path / "results.jsonl"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(many_images),
            "--model",
            str(tiny_bundle),
            "--out",
            str(out),
            "--top-k",
            "3",
            "--batch-size",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    records = read_records(out)
    paths = [r["path"] for r in records]
    assert len(records) == IMAGE_COUNT == len(set(paths))
    assert all(len(r["labels"]) == 3 for r in records)
    top = records[0]["labels"]
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"] and top[0]["label"].startswith("class_")
    assert f"labeled {IMAGE_COUNT}, errors 0" in result.output


def test_list_files_stdin_and_duplicates_give_one_record_per_path(many_images, tiny_bundle, tmp_path):
    images = sorted(str(p) for p in many_images.rglob("*.jpg"))[:6]
    (tmp_path / "list.txt").write_text("\n".join(images[:3]) + "\n\n")
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(
        main,
        ["run", f"@{tmp_path / 'list.txt'}", "-", images[0], "--model", str(tiny_bundle), "--out", str(out)],
        input="\n".join(images[3:]) + "\n",
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["path"] for r in read_records(out)) == images


def test_embeddings_on_request(many_images, tiny_bundle, tmp_path):
    image = str(next(many_images.rglob("*.jpg")))
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(
        main, ["run", image, "--model", str(tiny_bundle), "--out", str(out), "--embeddings"]
    )
    assert result.exit_code == 0, result.output
    (record,) = read_records(out)
    assert len(record["embedding"]) == 256  # the 1/8-width test model's pooled features (2048 / 8)
    assert all(isinstance(v, float) for v in record["embedding"])


def test_resume_after_a_kill_finishes_every_image_exactly_once(many_images, tiny_bundle, tmp_path):
    """SIGKILL a real `labeler run` mid-run (leaving maybe half a line), then --resume."""
    out = tmp_path / "r.jsonl"
    command = [
        sys.executable,
        "-m",
        "worker",
        "run",
        str(many_images),
        "--model",
        str(tiny_bundle),
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "8",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 20_000):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(completed_paths(out))
    assert 0 < done_before < IMAGE_COUNT, "the kill should land mid-run"
    with open(out, "a") as handle:  # as if the kill had cut a line in half
        handle.write('{"path": "/half/a/rec')
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped (already done) {done_before}" in resumed.stderr
    paths = [r["path"] for r in read_records(out)]
    assert len(paths) == IMAGE_COUNT == len(set(paths))


def test_missing_model_directory_is_a_clear_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["run", "x.jpg", "--model", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_python_dash_m_reaches_every_subcommand():
    for module, expected in (("worker", "run"), ("engine_build", "--weights")):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "120"},
        )
        assert result.returncode == 0 and expected in result.stdout, result.stderr


def test_retry_errors_labels_images_fixed_since_and_keeps_one_record_each(photo_dir, tiny_bundle, tmp_path):
    """A file missing during the run, then restored: --retry-errors drops the error records (a
    line cut by a kill too) and labels those images again; every path ends with one record."""
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted(photo_dir.glob("*.jpg"))[:4]:
        shutil.copy(photo, images / photo.name)
    late = images / "late.jpg"  # named in the list, restored only after the first run
    (images / "broken.jpg").write_bytes(b"\xff\xd8 still broken")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*(str(p) for p in sorted(images.glob("*.jpg"))), str(late)]) + "\n")
    out = tmp_path / "labels.jsonl"
    command = ["run", f"@{listing}", "--model", str(tiny_bundle), "--out", str(out), "--no-progress"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    codes = {r["path"]: r.get("error", {}).get("code") for r in read_records(out)}
    assert codes[str(late)] == "not_found" and codes[str(images / "broken.jpg")] == "decode_failed"

    shutil.copy(sorted(photo_dir.glob("*.jpg"))[0], late)
    with open(out, "a") as handle:
        handle.write('{"path": "/cut/by/a/kill')
    second = CliRunner().invoke(main, [*command, "--retry-errors"])
    assert second.exit_code == 0, second.output
    assert "2 error records dropped" in second.output
    assert "skipped (already done) 4" in second.output
    records = read_records(out)
    assert sorted(r["path"] for r in records) == sorted(codes)  # one record per path, none lost
    by_path = {r["path"]: r for r in records}
    assert "labels" in by_path[str(late)]
    assert by_path[str(images / "broken.jpg")]["error"]["code"] == "decode_failed"  # tried again
