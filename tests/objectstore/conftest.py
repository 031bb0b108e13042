"""Fixtures of the object-storage tests: one real SeaweedFS S3 server per session (about 5 s to
start), its buckets emptied of test objects by prefix, and the environment that points the
labeler's own client at it. See objectstore_helpers.py for the server itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from objectstore_helpers import SeaweedS3, labeler_environment, running_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    with running_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_admin(s3_server: SeaweedS3):
    """An s3fs client with every right on the server (to upload what a test reads)."""
    return s3_server.client()


@pytest.fixture
def s3_prefix() -> str:
    """A fresh key prefix per test, so tests sharing the server never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def labeler_s3_env(s3_server: SeaweedS3, monkeypatch) -> dict[str, str]:
    """This process's labeler code talks to the server as the read-only `labeler` identity."""
    with labeler_environment(s3_server, monkeypatch) as env:
        yield env
