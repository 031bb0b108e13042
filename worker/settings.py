"""Every setting of the distributed labeler, read from the environment in one place.

Workers, the client commands, deploy files and metrics all read `Settings.from_env()`, so a value
has one name (`LABELER_...`), one default and one check. Names, types, defaults, flags and help
live in one table, worker/setting_table.py; this class only gives them typed attributes (a test
holds the two to the same names and types). Command-line flags override single fields with
`dataclasses.replace`. The Redis URL carries the password, ACL user and TLS
(`rediss://:PASSWORD@host:6379/0?ssl_cert_reqs=required`), so secrets never need a separate knob.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from worker.dataset.object_path import canonical_output
from worker.setting_table import SETTINGS, TABLE, default

DEFAULT_BROKER_URL = default("broker_url")
_LIST_SEPARATOR = re.escape(os.pathsep) + "(?!//)"


class SettingsError(ValueError):
    """A setting has a value the labeler cannot work with."""


@dataclass(frozen=True)
class Settings:
    """One attribute per row of worker/setting_table.py, in its order; see it for each meaning."""

    # Redis: one URL for the broker and the result backend.
    broker_url: str = default("broker_url")
    queue: str = default("queue")
    key_prefix: str = default("key_prefix")
    # Delivery guarantees. The task enforces its own deadline (time limits need prefork); the
    # visibility timeout must outlast it or a healthy job would be handed to a second worker.
    task_deadline_s: float = default("task_deadline_s")
    deadline_grace_s: float = default("deadline_grace_s")
    visibility_timeout_s: int = default("visibility_timeout_s")
    restore_interval_s: int = default("restore_interval_s")
    restore_throttle: int = default("restore_throttle")
    max_attempts: int = default("max_attempts")
    lease_s: float = default("lease_s")
    heartbeat_s: float = default("heartbeat_s")
    sweep_interval_s: float = default("sweep_interval_s")
    reconcile_interval_s: float = default("reconcile_interval_s")
    orphan_after_s: float = default("orphan_after_s")
    result_expires_s: int = default("result_expires_s")
    redis_retry_s: float = default("redis_retry_s")
    # Worker: model and batching.
    model: str = default("model")
    backend: str = default("backend")
    precision: str = default("precision")
    allowed_roots: tuple[str, ...] = default("allowed_roots")
    concurrency: int = default("concurrency")
    pool: str = default("pool")
    batch_size: int = default("batch_size")
    max_wait_ms: float = default("max_wait_ms")
    decode_threads: int = default("decode_threads")
    fetch_concurrency: int = default("fetch_concurrency")
    intra_op_threads: int = default("intra_op_threads")
    top_k: int = default("top_k")
    embeddings: bool = default("embeddings")
    max_bytes: int = default("max_bytes")
    s3_endpoint_url: str = default("s3_endpoint_url")  # read by worker/dataset/storage.py
    max_pixels: int = default("max_pixels")
    decode: str = default("decode")
    flush_records: int = default("flush_records")
    metrics_port: int = default("metrics_port")
    output_roots: tuple[str, ...] = default("output_roots")
    # Client.
    shard_size: int = default("shard_size")
    max_queued_jobs: int = default("max_queued_jobs")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `LABELER_<FIELD>` for every field; unset or empty means the default."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for setting in TABLE:
            raw = env.get(setting.env, "").strip()
            if raw:
                values[setting.name] = _parse(setting.name, raw, setting.kind)
        return cls(**values).validated()

    def validated(self) -> Settings:
        """These settings, or SettingsError naming the variable: checked once, for every command."""
        if self.visibility_timeout_s <= self.task_deadline_s + self.deadline_grace_s:
            raise SettingsError(
                f"LABELER_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed "
                f"LABELER_TASK_DEADLINE_S + LABELER_DEADLINE_GRACE_S ({self.task_deadline_s} + "
                f"{self.deadline_grace_s}), or Redis hands a running job to a second worker"
            )
        for setting in TABLE:  # the table's bounds and choices, which the flags check too
            value = getattr(self, setting.name)
            if setting.minimum is not None and value < setting.minimum:
                raise SettingsError(f"{setting.env} ({value}) must be at least {setting.minimum}")
            if setting.choices and value not in setting.choices:
                raise SettingsError(f"{setting.env} ({value!r}) must be one of {', '.join(setting.choices)}")
        if not 0 < self.heartbeat_s * 2 < self.lease_s:
            raise SettingsError(
                f"LABELER_LEASE_S ({self.lease_s}) must exceed twice LABELER_HEARTBEAT_S ({self.heartbeat_s}), "
                "or a slow but living worker could lose its shard to a second one"
            )
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("LABELER_BROKER_URL must be a redis://, rediss:// or unix:// URL")
        return self

    def env(self) -> dict[str, str]:
        """These settings as environment variables (to hand to a worker subprocess)."""
        return {setting.env: setting.text(getattr(self, setting.name)) for setting in TABLE}


def default_output_root() -> str:
    home = os.environ.get("LABELER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "resnet-labeler")
    return os.path.join(home, "runs")


def output_roots(settings: Settings) -> tuple[str, ...]:
    """Where datasets may be written, spelled as run outputs are (folders resolved, bucket
    prefixes with their canonical protocol and no trailing slash), so the two compare."""
    return tuple(canonical_output(root) for root in settings.output_roots or (default_output_root(),))


def env_name(field_name: str) -> str:
    return SETTINGS[field_name].env


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is tuple:  # a ':' before '//' is a URL's (s3://bucket/prefix/), not a separator
            return tuple(part for part in re.split(_LIST_SEPARATOR, raw) if part)
        if kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a valid {kind.__name__}") from None
    return raw
