"""The test server itself is real S3 with real access control: the labeler's identity reads the
images bucket, is refused the private one, and a wrong secret is refused everywhere."""

from __future__ import annotations

import subprocess

import pytest
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET, Credentials, weed_binary


def test_weed_comes_from_the_wheel_not_path():
    path = weed_binary()  # found through the distribution's file list
    out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=30).stdout
    assert "version" in out.lower()


def test_identities_are_enforced(s3_server, s3_admin, s3_prefix):
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/a.bin", b"public")
    s3_admin.pipe(f"{PRIVATE_BUCKET}/{s3_prefix}/b.bin", b"private")
    labeler = s3_server.client(s3_server.labeler)
    assert labeler.cat_file(f"{IMAGES_BUCKET}/{s3_prefix}/a.bin") == b"public"
    with pytest.raises(PermissionError):
        labeler.cat_file(f"{PRIVATE_BUCKET}/{s3_prefix}/b.bin")
    with pytest.raises(PermissionError):
        labeler.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/c.bin", b"no writes")
    wrong = s3_server.client(Credentials(s3_server.labeler.access_key, "not-the-secret"))
    with pytest.raises(PermissionError):
        wrong.cat_file(f"{IMAGES_BUCKET}/{s3_prefix}/a.bin")
