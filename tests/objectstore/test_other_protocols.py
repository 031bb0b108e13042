"""The object-storage code is fsspec's API, not S3's: the same `labeler run` from a bucket prefix
into a bucket dataset, over fsspec's in-memory filesystem (`memory://`, always installed with
fsspec) as a stand-in for gs:// or az://, which cannot run here. S3 itself is tested against a real
server in the other files."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.dataset import storage
from worker.dataset.files import iter_records
from worker.dataset.manifest import read_manifest


@pytest.fixture
def memory_fs():
    fsspec = pytest.importorskip("fsspec")
    storage.clear_cache()
    fs = fsspec.filesystem("memory")
    root = f"/t-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)
    storage.clear_cache()


def test_labeler_run_from_and_into_another_protocol(memory_fs, photo_dir, tiny_bundle) -> None:
    fs, root = memory_fs
    files = sorted(p for p in photo_dir.glob("*.jpg") if "_large" not in p.name)
    fs.pipe({f"{root}/images/{p.name}": p.read_bytes() for p in files})
    fs.pipe_file(f"{root}/images/zz-truncated.jpg", files[0].read_bytes()[:200])
    base = f"memory://{root.lstrip('/')}"
    result = CliRunner().invoke(main, [
        "run", f"{base}/images/", f"{base}/elsewhere/x.jpg", "--model", str(tiny_bundle), "--no-progress",
        "--allowed-root", f"{base}/images/", "--out", f"{base}/labels/run/", "--shard-size", "2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in iter_records(f"{base}/labels/run")}
    assert sorted(records) == sorted([f"{base}/images/{p.name}" for p in files]
                                     + [f"{base}/images/zz-truncated.jpg", f"{base}/elsewhere/x.jpg"])  # fmt: skip
    assert records[f"{base}/images/zz-truncated.jpg"]["error"]["code"] == "decode_failed"
    assert records[f"{base}/elsewhere/x.jpg"]["error"]["code"] == "outside_allowed_roots"
    assert all(len(records[f"{base}/images/{p.name}"]["labels"]) == 5 for p in files)
    manifest = read_manifest(f"{base}/labels/run")
    assert manifest is not None and manifest["counts"]["rows"] == len(files) + 2
