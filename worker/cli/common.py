"""What the commands that talk to Redis share: settings with flag overrides, and opening a run.

Every such command takes `--broker URL` and otherwise reads LABELER_BROKER_URL (worker/settings.py
has every setting). Redis errors (auth, connection, TLS) become a one-line message, never a traceback
with the URL in it.
"""

from __future__ import annotations

import dataclasses

import click
import redis

from worker.ledger.ledger import RunLedger
from worker.ledger.redis_client import connect
from worker.settings import Settings, SettingsError

BROKER_HELP = "Redis URL (broker and results); default: $LABELER_BROKER_URL."


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
