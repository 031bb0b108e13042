"""One builder of the labeling service: what `labeler run` flags and a worker's LABELER_* settings
ask for is what the service gets, whatever the backend (the two builders used to drift apart)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from worker.pipeline.build import ServiceConfig, build_service, create_service_runner
from worker.runners.base import RunnerError
from worker.settings import Settings
from worker.sidecar import ModelSpec


def test_a_worker_config_is_read_field_by_field_from_its_settings() -> None:
    settings = Settings(backend="auto", precision="fp32", intra_op_threads=3, max_pixels=5000, embeddings=True,
                        top_k=2, allowed_roots=("/data",), max_bytes=1234, batch_size=7, decode_threads=2)  # fmt: skip
    config = ServiceConfig.pick(settings)
    for field in dataclasses.fields(ServiceConfig):
        assert getattr(config, field.name) == getattr(settings, field.name), field.name


def test_the_built_service_carries_every_setting_under_backend_auto(tiny_bundle) -> None:
    config = ServiceConfig(backend="auto", intra_op_threads=3, max_pixels=5000, embeddings=True, top_k=2,
                           allowed_roots=("/data",), max_bytes=1234, batch_size=7, decode_threads=2)  # fmt: skip
    service = build_service(tiny_bundle, config)
    assert service.runner.name == "onnxruntime"  # auto on a machine without a GPU
    assert service.runner.intra_op_threads == 3
    assert "3 intra-op threads" in service.runner.describe()
    options = service.options
    assert (options.max_pixels, options.embeddings, options.top_k, options.max_batch_size) == (5000, True, 2, 7)
    assert options.read_policy.max_bytes == 1234 and options.read_policy.allowed_roots == ("/data",)
    assert options.decode_threads == 2


def test_embeddings_from_a_bundle_without_features_are_refused_before_any_image(tiny_bundle, tmp_path) -> None:
    bundle = tmp_path / "no-features"
    shutil.copytree(tiny_bundle, bundle)
    dataclasses.replace(ModelSpec.load(bundle), features_output=None, feature_size=None).save(bundle)
    assert create_service_runner(bundle, ServiceConfig(embeddings=False)).spec.features_output is None
    with pytest.raises(RunnerError, match="no features output"):
        create_service_runner(bundle, ServiceConfig(embeddings=True))
