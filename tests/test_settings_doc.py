"""One default, one place: docs/settings.md, `Settings` and its LABELER_* parser, `ServiceConfig`
and every command's flags are made from worker/setting_table.py, and nothing writes a default again."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest

from worker.cli import main
from worker.pipeline.build import ServiceConfig
from worker.pipeline.decode_stage import DECODE_CHOICES
from worker.runners import BACKENDS
from worker.setting_table import SETTINGS, TABLE
from worker.settings import Settings, SettingsError
from worker.settings_doc import DOC, render_table, with_table

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = {str: "str", int: "int", float: "float", bool: "bool", tuple: "tuple[str, ...]"}
# Flags spelled like a setting's that set something else: `enqueue --embeddings` asks for
# embeddings in one run's options (LABELER_EMBEDDINGS forces them on every row a worker writes);
# `enqueue --model/--precision` name the model a --skip-done-in run is checked against.
OTHER_MEANING = {("enqueue", "--embeddings"), ("enqueue", "--model"), ("enqueue", "--precision")}
# The commands of the labeler itself (engine_build's `build --precision` names bundle models to make).
LABELER_COMMANDS = {name: command for name, command in main.commands.items()
                    if command.callback.__module__.startswith("worker.")}  # fmt: skip


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


def _setting_flags(command: click.Command) -> dict[str, click.Option]:
    by_flag = {setting.flag: setting for setting in TABLE if setting.flag}
    return {opt: param for param in command.params if isinstance(param, click.Option)
            for opt in param.opts if opt in by_flag}  # fmt: skip


def test_every_flag_of_a_setting_is_made_from_the_table() -> None:
    """Each command has the flags the table gives it, and no other option spelled like a setting's."""
    by_flag = {setting.flag: setting for setting in TABLE if setting.flag}
    for name, command in LABELER_COMMANDS.items():
        for flag, param in _setting_flags(command).items():
            if (name, flag) in OTHER_MEANING:
                continue
            setting = by_flag[flag]
            assert name in setting.commands, f"labeler {name} {flag} is not in the table's commands"
            assert param.name == setting.name, f"labeler {name} {flag}"
            help_text = param.help or ""
            assert help_text.startswith(setting.help), f"labeler {name} {flag}: help not the table's"
            if name == "run":  # reads no variable: the table's default is the flag's
                assert param.default == (setting.default if setting.default != "" else None), flag
            else:  # None: the variable, else the table's default, is taken
                assert param.default is None and f"${setting.env}" in help_text, f"labeler {name} {flag}"
    for setting in TABLE:
        for name in setting.commands:
            assert setting.flag in _setting_flags(main.commands[name]), f"labeler {name} lacks {setting.flag}"


def test_help_shows_the_tables_defaults() -> None:
    for name in ("run", "enqueue", "worker"):
        command = main.commands[name]
        ctx = click.Context(command, info_name=name)
        for flag, param in _setting_flags(command).items():
            if (name, flag) in OTHER_MEANING:
                continue
            setting = SETTINGS[param.name]
            if not setting.text() or setting.kind is bool:
                continue
            record = param.get_help_record(ctx)[1]
            shown = f"default: {setting.text()}" if name == "run" else f"${setting.env} or {setting.text()}"
            assert shown in record, f"labeler {name} {flag}: {record}"


def test_run_and_worker_build_the_same_service_by_default() -> None:
    """A one-process run and a worker with no flags and no variables pick the same backend, decode
    stage, caps and batching for the same bundle."""
    params = main.commands["run"].make_context("run", ["image.jpg"]).params
    from_run = ServiceConfig(**{item.name: params[item.name] for item in fields(ServiceConfig)})
    assert from_run == ServiceConfig.pick(Settings.from_env({}))
    assert from_run.backend == "auto"


@pytest.mark.parametrize(
    "pattern",
    [r"\b5000\b", r"64 \* 1024 \* 1024", r"128 \* 1024 \* 1024", r"\(\"cpu\", \"gpu\", \"auto\"\)",
     r"\[\"cpu\", \"gpu\", \"auto\"\]"],
)  # fmt: skip
def test_no_default_is_written_again_outside_the_table(pattern: str) -> None:
    hits = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "worker").rglob("*.py"))
        if path.name != "setting_table.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert not hits, f"{pattern} outside worker/setting_table.py: {hits}"


def test_the_commands_embedding_types_are_the_datasets() -> None:
    from worker.cli.common import EMBEDDING_DTYPES
    from worker.dataset.schema import EMBEDDING_DTYPES as COLUMN_TYPES

    assert set(EMBEDDING_DTYPES) == set(COLUMN_TYPES)
    for name in ("run", "enqueue"):
        (param,) = [p for p in main.commands[name].params if p.name == "embedding_dtype"]
        assert param.default == "float32" and tuple(param.type.choices) == EMBEDDING_DTYPES
