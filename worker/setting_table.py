"""The one table of settings: name, type, default, environment variable, flag and help of each.

Everything else is made from it, so a default is written once: `Settings` (worker/settings.py)
and its `LABELER_*` parser, `ServiceConfig` (worker/pipeline/build.py), the options of `labeler
run | worker | enqueue | ...` (worker/cli/common.py `setting_option`), the constants the runtime
keeps (`DEFAULT_MAX_BYTES`, `DEFAULT_MAX_PIXELS`, `DEFAULT_FETCH_CONCURRENCY`, `DECODE_CHOICES`)
and docs/settings.md (`python -m worker.settings_doc`). It imports nothing of the labeler, so
every layer (dataset, ledger, pipeline, client) may read its defaults.

The backend default is `auto` for every command: a worker and `labeler run` given the same bundle
on the same node pick the same runner (a TensorRT engine built for this GPU, else PyTorch CUDA,
else ONNX Runtime; a CPU-only node gets ONNX Runtime, as `onnxruntime` would). Choosing touches no
CUDA, so a Celery parent may choose before it forks. `labeler worker --gpu N` still means tensorrt
unless `--backend` says otherwise (the GPU image builds its engine at start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ALL_CLIENT_COMMANDS = ("worker", "enqueue", "status", "results", "retry", "report")


@dataclass(frozen=True)
class Setting:
    """One setting. `kind` is str, int, float, bool or tuple (a list of text, `:`-separated in
    its variable); `flag` exists on `commands` only. `help` is the flag's one line, `doc` the
    longer meaning in docs/settings.md (empty: `help`)."""

    name: str
    kind: type
    default: Any
    help: str
    doc: str = ""
    flag: str | None = None
    commands: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    minimum: int | None = None

    @property
    def env(self) -> str:
        return "LABELER_" + self.name.upper()

    @property
    def meaning(self) -> str:
        return self.doc or self.help

    def text(self, value: object | None = None) -> str:
        """`value` (default: the default) as its environment variable spells it."""
        value = self.default if value is None else value
        return os.pathsep.join(value) if isinstance(value, tuple) else str(value)


TABLE: tuple[Setting, ...] = (
    # -- Redis: one URL for the broker and the result backend ----------------------------------
    Setting("broker_url", str, "redis://localhost:6379/0", "Redis URL (broker, results and records).",
            doc="Redis URL for the broker, the result backend and the records; carries the password, ACL "
            "user and TLS options (`rediss://:PASS@host:6380/0?ssl_cert_reqs=required`)",
            flag="--broker", commands=ALL_CLIENT_COMMANDS),
    Setting("queue", str, "labeler", "Queue jobs are published to and consumed from.",
            flag="--queue", commands=("worker", "enqueue", "retry")),
    Setting("key_prefix", str, "labeler", "prefix of every run key in Redis (`PREFIX:run:NAME:*`)"),
    # -- delivery guarantees: the task keeps its own deadline; the visibility timeout outlasts it --
    Setting("task_deadline_s", float, 1800.0, "a job stops taking images after this long, writes what it "
            "finished and requeues the rest (the threads pool has no Celery time limits)"),
    Setting("deadline_grace_s", float, 15.0, "images in flight at the deadline may finish this long after it"),
    Setting("visibility_timeout_s", int, 3600, "a dead worker's jobs go back to the queue after this long; "
            "must exceed deadline + grace"),
    Setting("restore_interval_s", int, 10, "seconds between the sweeps that restore a dead worker's jobs"),
    Setting("restore_throttle", int, 10, "only every Nth sweep scans Redis"),
    Setting("max_attempts", int, 3, "times a shard is taken without finishing before it is split in halves "
            "(a half is split again at its next loss; one image left gets an `internal_error` row)", minimum=1),
    Setting("lease_s", float, 30.0, "a running shard's lease: a SIGKILLed or cut-off worker's shard is queued "
            "again (at the front) after this; must exceed twice the heartbeat"),
    Setting("heartbeat_s", float, 10.0, "how often a worker renews the leases of the shards it runs (however "
            "slow its images, a living worker keeps its shards)"),
    Setting("sweep_interval_s", float, 5.0, "how often each worker looks for lapsed leases to requeue; lease + "
            "sweep bound a lost shard's wait (35 s)"),
    Setting("reconcile_interval_s", float, 30.0, "how often each worker's sweeper looks for queued shards whose "
            "message was lost (Redis lost its last writes, a failover) and for finished runs without a manifest"),
    Setting("orphan_after_s", float, 60.0, "a queued shard with no message in the queue (nor taken by a worker "
            "within this time) is published again after this; a duplicate costs nothing"),
    Setting("result_expires_s", int, 7 * 24 * 3600, "lifetime of Celery job summaries (records never expire)"),
    Setting("redis_retry_s", float, 60.0, "how long a job retries Redis writes through an outage before "
            "requeueing itself; stop timeouts in deploy/ exceed it"),
    # -- the model and how it runs (worker, and `labeler run` by flag) ---------------------------
    Setting("model", str, "", "Model bundle (default: the embedded ResNet-50, built on first use).",
            doc="model bundle to serve; read-only is fine. Empty: the embedded default bundle (built on first "
            "use), resolved by `labeler worker` and `labeler run` at start; a bare `celery -A worker.app "
            "worker` needs it set", flag="--model", commands=("worker", "run")),
    Setting("backend", str, "auto", "Runner: auto (a TensorRT engine for this GPU, else PyTorch CUDA, else "
            "ONNX Runtime on the CPU), onnxruntime, tensorrt, torch-cuda.",
            doc="runner: `auto` (a TensorRT engine built for this GPU, else `torch-cuda`, else ONNX Runtime on "
            "the CPU; the same choice for a worker and `labeler run`), `onnxruntime` (CPU), `tensorrt`, "
            "`torch-cuda`; `labeler worker --gpu N` implies `tensorrt`",
            flag="--backend", commands=("worker", "run"),
            choices=("auto", "onnxruntime", "tensorrt", "torch-cuda")),
    Setting("precision", str, "fp32", "Which model of the bundle: fp32, fp16, int8 (int8 on ONNX Runtime "
            "runs the bundle's cpu-int8 model).", flag="--precision", commands=("worker", "run")),
    Setting("allowed_roots", tuple, (), "Only read files under this directory, or objects under this URL "
            "prefix (s3://bucket/prefix/); repeatable.",
            doc="directories or object URL prefixes (`s3://bucket/prefix/`) workers may read, `:`-separated "
            "(a `:` before `//` belongs to a URL; empty: anywhere); set it wherever other services can "
            "enqueue", flag="--allowed-root", commands=("worker", "run")),
    Setting("concurrency", int, 4, "Jobs in flight per worker process; their images share engine batches.",
            flag="--concurrency", commands=("worker",), minimum=1),
    Setting("pool", str, "threads", "Celery pool: threads (one engine per process, shared by its jobs: the "
            "design), solo, prefork (one engine per child; metrics then miss the children).",
            flag="--pool", commands=("worker",), choices=("threads", "solo", "prefork")),
    Setting("batch_size", int, 0, "Largest engine batch (0: the backend's default, 32 on the CPU and 128 on "
            "a GPU backend, capped by the engine).",
            doc="largest engine batch; 0: the backend's default, 32 on the CPU and 128 on a GPU (the GPU image "
            "also builds its engine for this batch)", flag="--batch-size", commands=("worker", "run")),
    Setting("max_wait_ms", float, 20.0, "Longest wait to fill a batch, in milliseconds.",
            flag="--max-wait-ms", commands=("worker", "run")),
    Setting("decode_threads", int, 0, "Decode threads per process (0: one per core).",
            doc="decode threads per worker (0: one per core); on a multi-GPU node, cores / GPUs",
            flag="--decode-threads", commands=("run",)),
    Setting("fetch_concurrency", int, 32, "Object URLs (s3://) read at once per process, overlapping "
            "decoding (0: read on the decode threads).",
            doc="object URLs (`s3://`) a worker process reads at once, on threads of their own, overlapping "
            "decoding and inference (the connection pool matches it); 0: read on the decode threads, one per "
            "thread. The in-flight bound grows by as many images (docs/object-storage.md)",
            flag="--fetch-concurrency", commands=("worker", "run"), minimum=0),
    Setting("intra_op_threads", int, 0, "ONNX Runtime intra-op threads (0: one per core).",
            flag="--threads", commands=("run",)),
    Setting("top_k", int, 5, "Labels per record.", flag="--top-k", commands=("run",)),
    Setting("embeddings", bool, False, "Add the 2048-d pooled features to each record.",
            doc="every row this worker writes carries the pooled features, whatever the run asked (a run asks "
            "with `labeler enqueue --embeddings`); needs a bundle built from PyTorch weights (the worker "
            "refuses to start with one that has none)", flag="--embeddings", commands=("run",)),
    Setting("max_bytes", int, 64 * 1024 * 1024, "Largest file read (bigger files get an error record).",
            flag="--max-bytes", commands=("run",)),
    Setting("s3_endpoint_url", str, "", "endpoint of an S3-compatible store (MinIO, SeaweedFS, Ceph); empty: "
            "AWS, or botocore's own `AWS_ENDPOINT_URL`. Credentials come from the standard AWS places "
            "(environment, shared config, instance or pod identity), never from a labeler setting"),
    Setting("max_pixels", int, 128 * 1024 * 1024, "Largest image decoded (decompression-bomb guard).",
            doc="largest image decoded; a header claiming more gets `too_large` before decoding "
            "(decompression bombs)", flag="--max-pixels", commands=("run",)),
    Setting("decode", str, "cpu", "Decode stage: cpu (OpenCV), gpu (nvImageCodec, with --backend "
            "torch-cuda), auto (gpu where it loads, else cpu).",
            doc="decode stage: `cpu` (OpenCV on the decode threads, the reference), `gpu` (JPEGs decoded per "
            "batch on the GPU with nvImageCodec and handed to the `torch-cuda` runner in device memory; other "
            "formats and failures fall back to OpenCV; `pip install '.[gpu-decode]'`), `auto` (gpu where "
            "that stage loads, else cpu). See docs/gpu.md",
            flag="--decode", commands=("worker", "run"), choices=("cpu", "gpu", "auto")),
    Setting("flush_records", int, 256, "records per per-worker activity update (one Redis round trip; "
            "`labeler status` throughput and the report's chart)"),
    Setting("metrics_port", int, 0, "port of the worker's Prometheus `/metrics` (0: none); deploy/ uses 9100 "
            "(systemd: 9100 + GPU index)"),
    Setting("output_roots", tuple, (), "folders or bucket prefixes (`s3://bucket/prefix/`) a run's dataset may "
            "be written under, `:`-separated (a `:` before `//` belongs to a URL); a job naming another output "
            "is refused. The first is the default parent (`ROOT/RUN`) for `labeler enqueue` without "
            "`--output`. Empty: `$LABELER_HOME/runs` (`~/.cache/resnet-labeler/runs`). Client and workers "
            "must see the same storage"),
    # -- the client -------------------------------------------------------------------------------
    Setting("shard_size", int, 5000, "Images per shard: one job and one Parquet file each.",
            doc="images per shard: one job, one Parquet file, one ledger entry; fixed by a run's first enqueue "
            "(`labeler run --out DIR/` cuts the same shards)", flag="--shard-size", commands=("enqueue", "run"),
            minimum=1),
    Setting("max_queued_jobs", int, 1000, "Wait while the queue holds more shards than this.",
            doc="`labeler enqueue` waits while the queue holds more shards than this (bounds Redis during a "
            "long enqueue)", flag="--max-queued", commands=("enqueue",)),
)  # fmt: skip

SETTINGS: dict[str, Setting] = {setting.name: setting for setting in TABLE}


def default(name: str) -> Any:
    """The table's default of setting `name` (a KeyError names a setting the table lacks)."""
    return SETTINGS[name].default
