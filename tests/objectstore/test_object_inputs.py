"""Object URLs as inputs against the real server: prefixes listed page by page in key order and
filtered like directories; lists and manifests that live in a bucket."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET

from worker.pipeline.inputs import InputError, can_repeat, iter_input_paths
from worker.pipeline.object_inputs import iter_prefix_images


def test_prefix_is_listed_lazily_paginated_sorted_and_filtered(s3_admin, s3_prefix, labeler_s3_env):
    keys = ["b/2.jpg", "a/1.PNG", "a/0.jpg", "c.jpg", "notes.txt", "a/sub/9.webp", "z.jpeg"]
    s3_admin.pipe({f"{IMAGES_BUCKET}/{s3_prefix}/in/{key}": b"x" for key in keys})
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/in-not/x.jpg", b"x")  # shares the prefix's stem only
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}/in"
    expected = [f"{base}/{key}" for key in sorted(k for k in keys if not k.endswith(".txt"))]
    pages = iter_prefix_images(base + "/", page_size=2)
    assert next(pages) == expected[0]  # a generator: the first page arrives before the rest is listed
    assert [expected[0], *pages] == expected
    assert list(iter_input_paths([base + "/"])) == expected
    assert list(iter_input_paths([base])) == expected  # a prefix without its slash, like a directory
    assert not can_repeat([base + "/"]) and can_repeat([f"{base}/c.jpg"])


def test_lists_and_manifests_in_a_bucket(s3_admin, s3_prefix, labeler_s3_env, tmp_path):
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    names = [f"{base}/img/{i}.jpg" for i in range(3)]
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/list.txt", ("\n".join([*names, "", "rel/local.jpg"]) + "\n").encode())
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/m.csv", ("path,label\n" + "".join(f"{n},x\n" for n in names)).encode())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"path": names, "other": [1, 2, 3]}), buffer)
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/m.parquet", buffer.getvalue())
    listed = list(iter_input_paths([f"@{base}/list.txt"]))
    assert listed[:3] == names and listed[3].endswith("/rel/local.jpg") and listed[3].startswith("/")
    assert list(iter_input_paths([f"{base}/m.csv"])) == names
    assert list(iter_input_paths([f"{base}/m.parquet"])) == names
    # A missing object is yielded as itself (it gets its not_found record when read).
    assert list(iter_input_paths([f"{base}/missing.jpg", f"{base}/missing.csv"])) == [
        f"{base}/missing.jpg", f"{base}/missing.csv",
    ]  # fmt: skip


def test_unreadable_listings_are_input_errors(s3_admin, s3_prefix, labeler_s3_env):
    s3_admin.pipe(f"{PRIVATE_BUCKET}/{s3_prefix}/a.jpg", b"x")
    with pytest.raises(InputError, match="access denied"):
        list(iter_input_paths([f"s3://{PRIVATE_BUCKET}/{s3_prefix}/"]))
    with pytest.raises(InputError):
        list(iter_input_paths([f"@s3://{IMAGES_BUCKET}/{s3_prefix}/no-such-list.txt"]))
    with pytest.raises(InputError, match="secret"):  # the message names the URL and nothing of the client
        list(iter_input_paths([f"s3://{PRIVATE_BUCKET}/{s3_prefix}/secret/"]))
    assert labeler_s3_env["AWS_SECRET_ACCESS_KEY"] not in str(
        pytest.raises(InputError, list, iter_input_paths([f"s3://{PRIVATE_BUCKET}/x/"])).value
    )
