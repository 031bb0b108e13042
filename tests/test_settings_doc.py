"""One default, one place: docs/settings.md, `Settings` and its LABELER_* parser and `ServiceConfig`
are made from worker/setting_table.py."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from worker.pipeline.build import ServiceConfig
from worker.pipeline.decode_stage import DECODE_CHOICES
from worker.runners import BACKENDS
from worker.setting_table import SETTINGS, TABLE
from worker.settings import Settings, SettingsError
from worker.settings_doc import DOC, render_table, with_table

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = {str: "str", int: "int", float: "float", bool: "bool", tuple: "tuple[str, ...]"}


def test_docs_table_is_the_codes_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert render_table() in text
    assert with_table(text) == text, "docs/settings.md differs from worker/setting_table.py: python -m worker.settings_doc"


def test_the_rendered_table_has_one_row_per_setting_with_its_default() -> None:
    rows = [line for line in render_table().splitlines() if line.startswith("| `LABELER_")]
    assert [row.split("`")[1] for row in rows] == [setting.env for setting in TABLE]
    shard = rows[[s.name for s in TABLE].index("shard_size")]
    assert "| `--shard-size` (enqueue, run) | `5000` |" in shard


def test_settings_class_has_the_tables_names_types_and_defaults_in_order() -> None:
    assert [item.name for item in fields(Settings)] == [setting.name for setting in TABLE]
    for item in fields(Settings):
        setting = SETTINGS[item.name]
        assert item.type == ANNOTATIONS[setting.kind], item.name
        assert item.default == setting.default, item.name


def test_env_parser_without_variables_gives_the_tables_defaults() -> None:
    settings = Settings.from_env({})
    assert {name: getattr(settings, name) for name in SETTINGS} == {s.name: s.default for s in TABLE}
    assert settings.env() == {setting.env: setting.text() for setting in TABLE}


def test_env_parser_checks_the_tables_bounds_and_choices() -> None:
    with pytest.raises(SettingsError, match="LABELER_SHARD_SIZE"):
        Settings.from_env({"LABELER_SHARD_SIZE": "0"})
    with pytest.raises(SettingsError, match="LABELER_FETCH_CONCURRENCY"):
        Settings.from_env({"LABELER_FETCH_CONCURRENCY": "-1"})
    with pytest.raises(SettingsError, match="LABELER_BACKEND"):
        Settings.from_env({"LABELER_BACKEND": "cuda"})
    assert Settings.from_env({"LABELER_POOL": "solo", "LABELER_DECODE": "auto"}).pool == "solo"


def test_service_config_defaults_are_the_tables() -> None:
    for item in fields(ServiceConfig):
        assert item.default == SETTINGS[item.name].default, item.name
    assert ServiceConfig() == ServiceConfig.pick(Settings.from_env({}))


def test_the_runtimes_choices_are_the_tables() -> None:
    """worker/runners keeps its own list (another layer's file): it must name the same backends."""
    assert SETTINGS["decode"].choices == DECODE_CHOICES
    assert SETTINGS["backend"].choices == BACKENDS
