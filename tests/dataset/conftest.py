"""The run spec most dataset tests share."""

from __future__ import annotations

import pytest
from dataset_records import MODEL_SHA

from worker.dataset.schema import DatasetSpec


@pytest.fixture
def spec() -> DatasetSpec:
    return DatasetSpec(model_sha256=MODEL_SHA, precision="fp32")
