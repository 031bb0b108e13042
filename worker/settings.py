"""Every setting of the distributed labeler, read from the environment in one place.

Workers, the client commands, deploy files and metrics all read `Settings.from_env()`, so a value
has one name (`LABELER_...`), one default and one check. Command-line flags override single fields
with `dataclasses.replace`. The Redis URL carries the password, ACL user and TLS
(`rediss://:PASSWORD@host:6379/0?ssl_cert_reqs=required`), so secrets never need a separate knob.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from worker.dataset.object_path import canonical_output
from worker.dataset.storage import DEFAULT_FETCH_CONCURRENCY

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
_LIST_SEPARATOR = re.escape(os.pathsep) + "(?!//)"


class SettingsError(ValueError):
    """A setting has a value the labeler cannot work with."""


@dataclass(frozen=True)
class Settings:
    # Redis: one URL for the broker and the result backend.
    broker_url: str = DEFAULT_BROKER_URL
    queue: str = "labeler"
    key_prefix: str = "labeler"
    # Delivery guarantees. The task enforces its own deadline (time limits need prefork); the
    # visibility timeout must outlast it or a healthy job would be handed to a second worker.
    task_deadline_s: float = 1800.0
    deadline_grace_s: float = 15.0  # images in flight at the deadline may finish this long after it
    visibility_timeout_s: int = 3600
    restore_interval_s: int = 10
    restore_throttle: int = 10
    max_attempts: int = 3  # a shard taken this often without finishing is bisected (one image: an error row)
    lease_s: float = 30.0  # a running shard's lease: a lost worker's shard is queued again after this
    heartbeat_s: float = 10.0  # how often a worker renews the leases of the shards it runs
    sweep_interval_s: float = 5.0  # how often each worker looks for lapsed leases to requeue
    reconcile_interval_s: float = 30.0  # how often each worker looks for orphaned shards and missing manifests
    orphan_after_s: float = 60.0  # a queued shard without a message for this long is published again
    result_expires_s: int = 7 * 24 * 3600
    redis_retry_s: float = 60.0  # how long a job keeps retrying Redis writes before requeueing
    # Worker: model and batching.
    model: str = ""
    backend: str = "onnxruntime"
    precision: str = "fp32"
    allowed_roots: tuple[str, ...] = ()
    concurrency: int = 4  # jobs in flight per worker process; they share engine batches
    pool: str = "threads"  # threads: one engine per process shared by all its jobs
    batch_size: int = 0  # 0: the backend's default (32 on the CPU, 128 on a GPU backend)
    max_wait_ms: float = 20.0
    decode_threads: int = 0
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY  # object URLs read at once per worker process (0: on the decode threads)
    intra_op_threads: int = 0
    top_k: int = 5
    embeddings: bool = False  # records carry the 2048-d pooled features (needs a PyTorch-built bundle)
    max_bytes: int = 64 * 1024 * 1024
    # An S3-compatible store's endpoint (MinIO, SeaweedFS, Ceph); empty: AWS (or AWS_ENDPOINT_URL).
    # Read by worker/dataset/storage.py; credentials come from the standard AWS places, never from here.
    s3_endpoint_url: str = ""
    max_pixels: int = 128 * 1024 * 1024  # decompression-bomb guard: largest image decoded
    decode: str = "cpu"  # decode stage: cpu (OpenCV), gpu (nvImageCodec + torch-cuda), auto
    flush_records: int = 256  # records per per-worker activity update (one Redis round trip)
    metrics_port: int = 0  # the worker's Prometheus /metrics port; 0: no endpoint
    # Where datasets go: a run's output must be under one of these folders or bucket prefixes
    # (s3://bucket/prefix/; the first is the default parent, `<root>/<run>`); empty:
    # $LABELER_HOME/runs (default ~/.cache/resnet-labeler/runs).
    output_roots: tuple[str, ...] = ()
    # Client.
    shard_size: int = 5000
    max_queued_jobs: int = 1000  # backpressure: enqueue waits while the queue holds more shards

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `LABELER_<FIELD>` for every field; unset or empty means the default."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for item in fields(cls):
            raw = env.get(env_name(item.name), "").strip()
            if not raw:
                continue
            values[item.name] = _parse(item.name, raw, item.default)
        return cls(**values).validated()

    def validated(self) -> Settings:
        if self.visibility_timeout_s <= self.task_deadline_s + self.deadline_grace_s:
            raise SettingsError(
                f"LABELER_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed "
                f"LABELER_TASK_DEADLINE_S + LABELER_DEADLINE_GRACE_S ({self.task_deadline_s} + "
                f"{self.deadline_grace_s}), or Redis hands a running job to a second worker"
            )
        if self.max_attempts < 1 or self.shard_size < 1 or self.concurrency < 1:
            raise SettingsError("max_attempts, shard_size and concurrency must be at least 1")
        if self.fetch_concurrency < 0:
            raise SettingsError("LABELER_FETCH_CONCURRENCY must be 0 (read on the decode threads) or more")
        if not 0 < self.heartbeat_s * 2 < self.lease_s:
            raise SettingsError(
                f"LABELER_LEASE_S ({self.lease_s}) must exceed twice LABELER_HEARTBEAT_S ({self.heartbeat_s}), "
                "or a slow but living worker could lose its shard to a second one"
            )
        if self.decode not in ("cpu", "gpu", "auto"):
            raise SettingsError("LABELER_DECODE must be cpu, gpu or auto")
        if self.pool not in ("threads", "solo", "prefork"):
            raise SettingsError("LABELER_POOL must be threads, solo or prefork")
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("LABELER_BROKER_URL must be a redis://, rediss:// or unix:// URL")
        return self

    def env(self) -> dict[str, str]:
        """These settings as environment variables (to hand to a worker subprocess)."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            out[env_name(item.name)] = os.pathsep.join(value) if isinstance(value, tuple) else str(value)
        return out


def default_output_root() -> str:
    home = os.environ.get("LABELER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "resnet-labeler")
    return os.path.join(home, "runs")


def output_roots(settings: Settings) -> tuple[str, ...]:
    """Where datasets may be written, spelled as run outputs are (folders resolved, bucket
    prefixes with their canonical protocol and no trailing slash), so the two compare."""
    return tuple(canonical_output(root) for root in settings.output_roots or (default_output_root(),))


def env_name(field_name: str) -> str:
    return "LABELER_" + field_name.upper()


def _parse(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, tuple):  # a ':' before '//' is a URL's (s3://bucket/prefix/), not a separator
            return tuple(part for part in re.split(_LIST_SEPARATOR, raw) if part)
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r} is not a valid {type(default).__name__}") from None
    return raw
