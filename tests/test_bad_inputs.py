"""Every kind of bad input gets its own error record, and the run still labels the good ones.

Runs the real `labeler run` command in a subprocess over a catalog of broken files, then checks one
record per input with the expected stable error code.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.pipeline.errors import ImageError
from worker.pipeline.reading import ReadPolicy, read_image_bytes
from worker.records import ErrorCode


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """Patch a real JPEG's frame header to claim another size."""
    pos = 2
    while True:
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC2):
            return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]
        pos += 2 + length


def run_labeler(*args: str) -> list[dict]:
    out = Path(args[args.index("--out") + 1])
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, photos) -> dict[str, tuple[Path, str | None]]:
    """name -> (path, expected error code or None for a good image)."""
    root = tmp_path_factory.mktemp("catalog")
    good = cv2.imencode(".jpg", photos["cat"][..., ::-1])[1].tobytes()
    png = cv2.imencode(".png", photos["coffee"][..., ::-1])[1].tobytes()
    outside_dir = tmp_path_factory.mktemp("outside")
    (outside_dir / "secret.jpg").write_bytes(good)
    (outside_dir / "other.jpg").write_bytes(good)
    files = {
        "good.jpg": (good, None),
        "good.png": (png, None),
        "empty.jpg": (b"", "decode_failed"),
        "truncated.jpg": (good[: len(good) // 2], "decode_failed"),
        "truncated.png": (png[: len(png) // 2], "decode_failed"),
        "corrupt.jpg": (
            good[:200] + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
            "decode_failed",
        ),
        "text.jpg": (b"this is a text file, not a picture\n" * 20, "decode_failed"),
        "bomb.png": (png_claiming(100_000, 100_000), "too_large"),
        "bomb.jpg": (jpeg_claiming(good, 60_000, 60_000), "too_large"),
        "big-file.jpg": (good + b"\0" * 700_000, "too_large"),
    }
    entries: dict[str, tuple[Path, str | None]] = {}
    for name, (data, code) in files.items():
        (root / name).write_bytes(data)
        entries[name] = (root / name, code)
    (root / "folder.jpg").mkdir()
    entries["folder.jpg"] = (root / "folder.jpg", "not_a_file")
    entries["missing.jpg"] = (root / "missing.jpg", "not_found")
    os.mkfifo(root / "fifo.jpg")
    entries["fifo.jpg"] = (root / "fifo.jpg", "not_a_file")
    (root / "escape.jpg").symlink_to(outside_dir / "secret.jpg")
    entries["escape.jpg"] = (root / "escape.jpg", "outside_allowed_roots")
    entries["outside.jpg"] = (outside_dir / "secret.jpg", "outside_allowed_roots")
    entries["dotdot.jpg"] = (Path(f"{root}/../{outside_dir.name}/other.jpg"), "outside_allowed_roots")
    (root / "zero.jpg").symlink_to("/dev/zero")
    entries["zero.jpg"] = (root / "zero.jpg", "outside_allowed_roots")
    return entries


def test_each_bad_input_gets_its_code_and_the_run_completes(catalog, tiny_bundle, tmp_path):
    """Paths go through a list file, as they would from another system: a directory named there is
    an input like any other (on the command line a directory would be walked instead)."""
    list_file = tmp_path / "paths.txt"
    list_file.write_text("".join(f"{path}\n" for path, _ in catalog.values()))
    root = catalog["good.jpg"][0].parent
    records = run_labeler(
        f"@{list_file}",
        "--model",
        str(tiny_bundle),
        "--out",
        str(tmp_path / "r.jsonl"),
        "--allowed-root",
        str(root),
        "--max-bytes",
        "600000",
    )
    by_path = {r["path"]: r for r in records}
    assert len(records) == len(catalog) == len(by_path), "exactly one record per input"
    for name, (path, code) in catalog.items():
        record = by_path[os.path.abspath(path)]
        if code is None:
            assert "labels" in record and len(record["labels"]) == 5, name
        else:
            assert record.get("error", {}).get("code") == code, (name, record)
            assert record["error"]["message"], name


def test_device_symlinks_and_fifos_are_not_files_without_roots(catalog, tiny_bundle, tmp_path):
    records = run_labeler(
        str(catalog["zero.jpg"][0]),
        str(catalog["fifo.jpg"][0]),
        str(catalog["good.jpg"][0]),
        "--model",
        str(tiny_bundle),
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    codes = sorted(r.get("error", {}).get("code", "ok") for r in records)
    assert codes == ["not_a_file", "not_a_file", "ok"]


def test_unreadable_file_is_permission_denied():
    tmp_path = Path(tempfile.mkdtemp(prefix="labeler-perm-"))
    target = tmp_path / "locked.jpg"
    target.write_bytes(b"\xff\xd8 not really")
    target.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ImageError) as caught:
            read_image_bytes(str(target), ReadPolicy())
        assert caught.value.code == ErrorCode.PERMISSION_DENIED
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop privileges to test EACCES")
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if parent == Path("/"):
            break
        if not parent.stat().st_mode & 0o001:
            pytest.skip(f"{parent} is not traversable by an unprivileged user")
    code = (
        f"import sys; sys.path[:0] = {sys.path!r}\n"
        "from worker.pipeline.reading import read_image_bytes, ReadPolicy\n"
        "from worker.pipeline.errors import ImageError\n"
        f"try:\n    read_image_bytes({str(target)!r}, ReadPolicy())\nexcept ImageError as e:\n    print(e.code)\n"
    )
    result = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "permission_denied" not in result.stdout and "Permission denied" in result.stderr:
        pytest.skip(f"unprivileged python cannot start here: {result.stderr[-200:]}")
    assert result.stdout.strip() == "permission_denied", result.stderr
