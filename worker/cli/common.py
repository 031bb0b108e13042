"""What the commands share: options made from the settings table, settings with flag overrides,
and opening a run.

Every flag that sets a setting is made by `setting_option` from worker/setting_table.py, so its
type, choices, bounds, help and default are the variable's and the docs' (docs/settings.md).
Every command that talks to Redis takes `--broker URL` and otherwise reads LABELER_BROKER_URL.
Redis errors (auth, connection, TLS) become a one-line message, never a traceback with the URL in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click
import redis

from worker.ledger.ledger import RunLedger
from worker.ledger.redis_client import connect
from worker.setting_table import SETTINGS
from worker.settings import Settings, SettingsError


def setting_option(name: str, *, from_env: bool = True, **overrides: Any) -> Callable:
    """The click option of setting `name`, passed to the command as `name`.

    A command that reads LABELER_* (`from_env`) gets None when the flag is not given, so
    `load_settings` keeps the variable's value, else the table's default; `labeler run` reads no
    variables, so there the table's default is the option's own. `overrides` are click's keywords
    (a path type, say) that replace the ones made here.
    """
    setting = SETTINGS[name]
    if setting.flag is None:
        raise ValueError(f"setting {name} has no flag in worker/setting_table.py")
    kwargs: dict[str, Any] = {"help": setting.help}
    if setting.kind is bool:
        kwargs["is_flag"] = True
    elif setting.kind is tuple:
        kwargs["multiple"] = True
    elif setting.choices:
        kwargs["type"] = click.Choice(setting.choices)
    elif setting.minimum is not None:
        kwargs["type"] = click.IntRange(min=setting.minimum)
    else:
        kwargs["type"] = setting.kind
    if from_env:
        shown = f" or {setting.text()}" if setting.text() else ""
        kwargs["help"] += f" [default: ${setting.env}{shown}]"
        kwargs["default"] = None
    else:
        kwargs["default"] = setting.default if setting.default != "" else None
        kwargs["show_default"] = True
    return click.option(setting.flag, name, **(kwargs | overrides))


EMBEDDING_DTYPES = ("float32", "float16")  # the dataset's embedding column types (worker/dataset/schema.py)


def embedding_dtype_option(help_text: str | None = None) -> Callable:
    """`--embedding-dtype` (run, enqueue): one list of types and one default."""
    return click.option("--embedding-dtype", type=click.Choice(EMBEDDING_DTYPES), default=EMBEDDING_DTYPES[0],
                        show_default=True, help=help_text)  # fmt: skip


def interval_option(what: str) -> Callable:
    """`--interval` of the commands that follow a run (enqueue --wait, status --watch, retry --wait)."""
    return click.option("--interval", type=float, default=2.0, show_default=True, help=f"Seconds between {what} updates.")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with the flags that were given (None or () means not given)."""
    try:
        base = Settings.from_env()
        given = {k: v for k, v in overrides.items() if v not in (None, ())}
        return dataclasses.replace(base, **given).validated()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def open_store(settings: Settings) -> RunLedger:
    return RunLedger(connect(settings.broker_url), settings.key_prefix)


def open_run(settings: Settings, run: str) -> RunLedger:
    """The store, once `run` is known to exist there; a one-line ClickException otherwise."""
    store = open_store(settings)
    try:
        exists = store.exists(run)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    if not exists:
        raise click.ClickException(f"no run named {run!r} in {settings.key_prefix}:run:*")
    return store


def container_options(command):
    """The flags that say how tar shards and Parquet files of image bytes are read (run, enqueue)."""
    options = [
        click.option("--image-ext", help="Tar shards: the sample member that is the image (e.g. jpg; "
                     "default: each sample's first member with an image extension)."),  # fmt: skip
        click.option("--image-column", help="Parquet inputs: the column of image bytes (default: found by "
                     "type, a struct<bytes, path> or binary column)."),  # fmt: skip
        click.option("--key-column", help="Parquet inputs: the file's own key column (default: 'key' where there is one)."),
        click.option("--samples-per-shard", type=click.IntRange(min=1), help="Cut tar and Parquet inputs larger than "
                     "this into ranges, one shard each (reads each tar's headers once at enqueue; default: one "
                     "shard per file)."),  # fmt: skip
    ]
    for option in reversed(options):
        command = option(command)
    return command


def input_entries(
    inputs: tuple[str, ...], image_ext: str | None, image_column: str | None, key_column: str | None,
    samples_per_shard: int | None,
):  # fmt: skip
    """INPUTS as entries (paths and containers, streamed) read with the flags above."""
    from worker.pipeline.inputs import iter_input_paths
    from worker.sources.container import ContainerOptions

    formats = ContainerOptions(image_extension=image_ext.lstrip(".").lower() if image_ext else None,
                               image_column=image_column, key_column=key_column)  # fmt: skip
    entries = iter_input_paths(inputs, formats=formats)
    if samples_per_shard:
        from worker.sources.splitting import split_entries

        entries = split_entries(entries, samples_per_shard)
    return entries


def earlier_datasets(named: tuple[str, ...], out_dir: str) -> list | None:
    """The chain `--skip-done-in` names, followed through each manifest's lineage (None: none
    named), or a one-line error."""
    if not named:
        return None
    from worker.delta.lineage import LineageError, resolve_chain

    try:
        return resolve_chain(named, out_dir)
    except LineageError as exc:
        raise click.ClickException(str(exc)) from None
