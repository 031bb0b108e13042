"""The JSON Schemas in docs/queue-contract.md hold for what the code writes and reads: the job
arguments `labeler enqueue` publishes, the records the pipeline makes, and the refusals."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import jsonschema
import pytest

from worker.ledger.protocol import PATHS_TASK, SHARD_TASK, paths_message, shard_message
from worker.records import ErrorCode, error_record, label_record

DOC = Path(__file__).resolve().parents[1] / "docs" / "queue-contract.md"


def schemas() -> dict[str, dict]:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    found = {}
    for block in blocks:
        try:
            data = json.loads(block)
        except ValueError:
            continue  # the message and result examples carry placeholders
        if "$schema" in data:
            found[data["title"]] = data
    return found


def kwargs_of(message: str) -> dict:
    return json.loads(base64.b64decode(json.loads(message)["body"]))[1]


def test_the_doc_has_a_schema_for_each_job_and_the_record() -> None:
    assert set(schemas()) == {f"{PATHS_TASK} job", f"{SHARD_TASK} job", "labeler record"}


def test_what_the_code_publishes_matches_the_schemas() -> None:
    found = schemas()
    jsonschema.validate(kwargs_of(shard_message("photos", "000012", "/out/photos", "labeler")), found[f"{SHARD_TASK} job"])
    with_paths = shard_message("photos", "000012.1", "/out/photos", "labeler", paths=["/a.jpg"])
    jsonschema.validate(kwargs_of(with_paths), found[f"{SHARD_TASK} job"])
    jsonschema.validate(kwargs_of(paths_message(["/a.jpg"], "labeler", embeddings=True)[1]), found[f"{PATHS_TASK} job"])


@pytest.mark.parametrize("kwargs", [
    {"run": "bad run", "shard": "000001", "output": "/o"},
    {"run": "r", "shard": "../etc", "output": "/o"},
    {"run": "r", "shard": "000001"},
    {"run": "r", "shard": "000001", "output": "/o", "paths": []},
])  # fmt: skip
def test_the_shard_schema_refuses_what_workers_refuse(kwargs: dict) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(kwargs, schemas()[f"{SHARD_TASK} job"])


def test_records_match_the_record_schema() -> None:
    schema = schemas()["labeler record"]
    jsonschema.validate(label_record("/a.jpg", [{"index": 3, "label": "x", "score": 0.5}]), schema)
    for code in ErrorCode:
        if code != ErrorCode.INFERENCE_FAILED:  # never kept as an image's record
            jsonschema.validate(error_record("/a.jpg", code, "why"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(error_record("/a.jpg", ErrorCode.INFERENCE_FAILED, "engine"), schema)
