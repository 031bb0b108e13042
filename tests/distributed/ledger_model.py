"""A model-based test of the run ledger (issue 18), shared by the CI test and the bench.

Hypothesis drives random interleavings of what workers, sweepers, the reconciler, a client and
Redis itself do to two small runs, against a real redis-server (AOF everysec) and real files
(the shard list enqueue_run writes, Parquet shards from write_shard, manifest.json), and checks
after every step that the ledger and storage agree (`check_run`). Its teardown lets a fault-free
fleet drain the runs and checks the end state: every image has exactly one row among the files
the run's manifest lists (`drain`).

Workers are plain Python, no Celery: a delivery pops the queue's Redis list (RPOP, as BRPOP) and
records the message in kombu's `unacked` hash and `unacked_index` sorted set as kombu does, so the
reconciler's message scan sees it; an ack removes it; Reject(requeue) puts it back at the far end
(LPUSH) only if its `unacked` entry is still there, as kombu's restore_by_tag does. A worker that
dies leaves its messages in `unacked` and its leases to lapse.

Time is a fake clock given to every RunLedger (the client's too, patched in), so leases lapse by
advancing it, never by sleeping. "Lose the last second of writes" restores a copy of the AOF
directory taken a few steps earlier onto a SIGKILLed server: the model then accepts whatever the
ledger forgot, while the files on storage stay.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow.parquet as pq
import redis
from distributed_helpers import RedisServer, wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import worker.client.enqueue as enqueue_module
import worker.client.retry as retry_module
from worker.celery_worker.leases import Sweeper
from worker.celery_worker.reconcile import Reconciler
from worker.client.enqueue import enqueue_run
from worker.client.retry import retry_failed
from worker.dataset.files import ShardFile, iter_records, shard_files, write_shard
from worker.dataset.manifest import file_counts, read_manifest
from worker.dataset.schema import DatasetError, DatasetSpec
from worker.dataset.shard_list import (
    ShardListError,
    children,
    halves,
    read_index,
    root_shard_id,
    shard_source,
)
from worker.ledger.keys import lease_member
from worker.ledger.ledger import RunLedger, ShardState
from worker.ledger.messages import UNACKED, UNACKED_INDEX, shard_of
from worker.ledger.protocol import shard_message
from worker.ledger.run_manifest import write_manifest_if_finished
from worker.ledger.states import State, Verdict
from worker.records import ErrorCode, error_code, error_record, is_error, label_record

QUEUE = "model-q"
PREFIX = "labeler"
LEASE_S = 10.0
MAX_ATTEMPTS = 1  # a root shard's attempts (a half gets one too, as job.py gives it): splits come soon
ORPHAN_AFTER_S = 5.0
VISIBILITY_S = 60.0  # kombu restores an unacked message this long after its delivery
CONCURRENCY = 3  # messages one worker process holds at once (threads pool, prefetch 1)
TOP_K = 1
CHECKPOINT_WINDOW = 4  # "the last second of writes": a checkpoint at most this many steps old
START = 2_000_000_000.0  # the fake clock's epoch seconds at the start of each example
MODEL_SHA = hashlib.sha256(b"ledger model test").hexdigest()
SPEC = DatasetSpec(model_sha256=MODEL_SHA, precision="fp32")
RUNS = {"ra": (5, 2), "rb": (1, 1)}  # run -> (images, shard size): shards 2+2+1, and 1
WORKERS = ("w0", "w1")

STATS: Counter[str] = Counter()  # rules run, examples, faults met: the bench prints them


def run_paths(run: str) -> list[str]:
    return [f"/images/{run}/{i:03d}.jpg" for i in range(RUNS[run][0])]


def ci_settings(examples: int = 25, steps: int = 30, derandomize: bool = True) -> settings:
    """Bounded for CI (25 examples of up to 30 steps), and the same examples every run
    (derandomized: CI does not fail by chance); the bench passes more, at random."""
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                    derandomize=derandomize, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@dataclass
class Delivery:
    """One message a simulated worker took, and how far its job got."""

    tag: str
    raw: bytes
    run: str
    shard: str
    output: str
    stage: str = "delivered"  # delivered -> running -> written, or exhausted (give up pending)
    owner: str = ""
    paths: list[str] = field(default_factory=list)
    lost: bool = False  # a heartbeat heard the lease was taken over
    file: ShardFile | None = None


@dataclass
class SimWorker:
    """A worker process: alive or dead, and the messages it holds."""

    name: str
    alive: bool = True
    deliveries: list[Delivery] = field(default_factory=list)

    def held(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.stage in ("running", "written")]


def counted(rule_function: Callable[..., None]) -> Callable[..., None]:
    """Count each rule run (for the bench) and remember a step that raised, so the teardown
    does not bury the failure under a drain of a broken state."""

    @functools.wraps(rule_function)
    def wrapper(self: LedgerMachine, **kwargs: Any) -> None:
        STATS[f"rule {rule_function.__name__}"] += 1
        STATS["steps"] += 1
        self.steps += 1
        self.steps_since_checkpoint += 1
        try:
            rule_function(self, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper


@dataclass(frozen=True)
class FileFacts:
    """What a shard file holds: its paths (row order) and its footer's counts."""

    paths: tuple[str, ...]
    rows: int
    failed: int


_FACTS: dict[tuple[str, int, int, int], FileFacts] = {}


def file_facts(path: Path) -> FileFacts:
    """A shard file's facts, read once per version of the file (checked after every step)."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _FACTS:
        if len(_FACTS) > 10_000:
            _FACTS.clear()
        table = pq.read_table(path, columns=["path"])
        rows, failed = file_counts(path)
        _FACTS[key] = FileFacts(tuple(table.column("path").to_pylist()), rows, failed)
    return _FACTS[key]


def redis_contents(client: redis.Redis) -> dict[bytes, tuple[bytes, Any]]:
    """Every key's type and value, to compare Redis before and after a restart."""
    contents: dict[bytes, tuple[bytes, Any]] = {}
    readers = {
        b"hash": client.hgetall,
        b"zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        b"list": lambda key: client.lrange(key, 0, -1),
        b"set": client.smembers,
        b"string": client.get,
    }
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        contents[key] = (kind, readers[kind](key))
    return contents


class LedgerMachine(RuleBasedStateMachine):
    """The fleet around one Redis and one output folder; `machine_for` binds those."""

    server: RedisServer
    root: Path
    window: int = CHECKPOINT_WINDOW

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.now = START
        self.broken = False
        self.forgot = False  # the last writes were lost in this example: the ledger forgot things
        self.steps = self.last_restart = self.last_enqueue = 0
        self.steps_since_checkpoint = 0
        self.checkpoint_dir: Path | None = None
        self.numbers = itertools.count()
        self.client = self.server.client()
        self.client.flushall()
        self._compact_aof()
        self.out = Path(tempfile.mkdtemp(prefix="example-", dir=self.root))
        self.ledger = RunLedger(self.client, PREFIX, clock=self.clock)
        self.sweeper = Sweeper(lambda: self.ledger, QUEUE, interval_s=1.0)
        self.reconciler = Reconciler(lambda: self.ledger, QUEUE, ORPHAN_AFTER_S, TOP_K)
        self.workers = {name: SimWorker(name) for name in WORKERS}
        self.enqueued: set[str] = set()
        self.seen_done: dict[str, set[str]] = {run: set() for run in RUNS}  # finishes the model saw

    def clock(self) -> float:
        return self.now

    def output(self, run: str) -> Path:
        return self.out / run

    # -- Redis as a broker: kombu's bookkeeping of delivered messages -----------------------------

    def _compact_aof(self) -> None:
        """Rewrite the AOF when earlier examples made it big, so restarts stay quick."""
        if int(self.client.info("persistence").get("aof_current_size", 0)) < 2_000_000:
            return
        self.client.bgrewriteaof()

        def rewritten() -> bool:
            info = self.client.info("persistence")
            return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

        wait_for(rewritten, 30, "the AOF rewrite", interval=0.02)

    def _ack(self, worker: SimWorker, delivery: Delivery) -> None:
        pipe = self.client.pipeline()
        pipe.zrem(UNACKED_INDEX, delivery.tag)
        pipe.hdel(UNACKED, delivery.tag)
        pipe.execute()
        worker.deliveries.remove(delivery)

    def _reject_requeue(self, worker: SimWorker, delivery: Delivery) -> None:
        """Celery's Reject(requeue=True) on Redis: kombu's restore_by_tag(leftmost=True) pushes
        the message back at the far end, read from `unacked` (gone from there: not restored)."""
        pipe = self.client.pipeline()
        pipe.hget(UNACKED, delivery.tag)
        pipe.hdel(UNACKED, delivery.tag)
        pipe.zrem(UNACKED_INDEX, delivery.tag)
        stored = pipe.execute()[0]
        if stored is not None:
            envelope, _exchange, routing_key = json.loads(stored)
            self.client.lpush(routing_key, json.dumps(envelope))
        else:
            STATS["reject found no unacked entry (message dropped, as kombu does)"] += 1
        worker.deliveries.remove(delivery)

    def _take(self) -> Delivery | None:
        raw = self.client.rpop(QUEUE)
        if raw is None:
            return None
        envelope = json.loads(raw)
        run, shard = shard_of(envelope) or ("", "")
        output = json.loads(base64.b64decode(envelope["body"]))[1]["output"]
        tag = f"tag-{next(self.numbers)}"
        return Delivery(tag, raw, run, shard, output)

    def _record_delivery(self, worker: SimWorker, delivery: Delivery) -> None:
        pipe = self.client.pipeline()
        pipe.hset(UNACKED, delivery.tag, json.dumps([json.loads(delivery.raw), "", QUEUE]))
        pipe.zadd(UNACKED_INDEX, {delivery.tag: self.now})
        pipe.execute()
        worker.deliveries.append(delivery)

    # -- what picks a worker or a message ----------------------------------------------------------

    def _found(self, *stages: str) -> list[tuple[SimWorker, Delivery]]:
        return [(w, d) for w in self.workers.values() if w.alive for d in w.deliveries if d.stage in stages]

    def _pick(self, pick: int, *stages: str) -> tuple[SimWorker, Delivery]:
        found = self._found(*stages)
        return found[pick % len(found)]

    def _room(self) -> list[SimWorker]:
        return [w for w in self.workers.values() if w.alive and len(w.deliveries) < CONCURRENCY]

    # -- a client ---------------------------------------------------------------------------------

    @contextmanager
    def _client_clock(self) -> Iterator[None]:
        """The client's RunLedger on the fake clock too (enqueue_run and retry_failed make their own)."""
        clocked = functools.partial(RunLedger, clock=self.clock)
        with (
            mock.patch.object(enqueue_module, "RunLedger", clocked),
            mock.patch.object(retry_module, "RunLedger", clocked),
        ):
            yield

    def _enqueue(self, run: str) -> None:
        images, shard_size = RUNS[run]
        with self._client_clock():
            summary = enqueue_run(self.client, run, run_paths(run), str(self.output(run)), QUEUE, shard_size,
                                  max_queued_jobs=10_000, prefix=PREFIX, poll_s=0.0)  # fmt: skip
        assert summary.seen == images
        if summary.from_storage:
            STATS["enqueue adopted shards from storage"] += 1
        self.enqueued.add(run)
        self.last_enqueue = self.steps

    @initialize()
    def first_enqueue(self) -> None:
        self._enqueue("ra")

    def _failed_runs(self) -> list[str]:
        return [
            run
            for run in sorted(self.enqueued)
            if self.client.hexists(self.ledger.keys(run).meta, "failed_reason")
        ]

    @precondition(lambda self: self.steps - self.last_enqueue >= 5 or bool(self._failed_runs()))
    @rule(run=st.sampled_from(sorted(RUNS)))
    @counted
    def enqueue(self, run: str) -> None:
        """Enqueue a run, or again: the stored list is reused, shards done on storage are
        adopted, a failure is cleared, queued and lapsed shards are published."""
        self._enqueue(run)

    def _with_failed_images(self) -> list[str]:
        return [run for run in sorted(self.enqueued)
                if any(s.state == State.DONE and s.failed for s in self.ledger.shard_states(run))]  # fmt: skip

    @precondition(lambda self: bool(self._with_failed_images()))
    @rule(run=st.sampled_from(sorted(RUNS)), codes=st.sampled_from([(), ("not_found",)]))
    @counted
    def retry(self, run: str, codes: tuple[str, ...]) -> None:
        """`labeler retry`: done shards with failed images are reopened and published."""
        with self._client_clock():
            summary = retry_failed(self.client, run, QUEUE, codes, prefix=PREFIX)
        if summary.shards:
            done = {s.shard_id for s in self.ledger.shard_states(run) if s.state == State.DONE}
            self.seen_done[run] &= done

    # -- workers ----------------------------------------------------------------------------------

    @precondition(lambda self: bool(self._room()) and self.client.llen(QUEUE) > 0)
    @rule(pick=st.integers(0, 3), fate=st.integers(0, 5))
    @counted
    def deliver(self, pick: int, fate: int) -> None:
        """A worker takes the next message (BRPOP, then kombu records it as unacked); with fate
        5 it dies between the two, and the message is gone."""
        worker = self._room()[pick % len(self._room())]
        delivery = self._take()
        if fate == 5:
            STATS["messages lost with a worker that had just taken them"] += delivery is not None
            self._die(worker)
        elif delivery is not None:
            self._record_delivery(worker, delivery)

    def _work_items(self) -> list[tuple[SimWorker, Delivery | None]]:
        items: list[tuple[SimWorker, Delivery | None]] = list(
            self._found("delivered", "running", "written", "exhausted")
        )
        if self._room() and self.client.llen(QUEUE) > 0:
            items.append((self._room()[0], None))
        return items

    @precondition(lambda self: bool(self._work_items()))
    @rule(pick=st.integers(0, 7), errors=st.booleans())
    @counted
    def work(self, pick: int, errors: bool) -> None:
        """Any job takes its next step with nothing failing: a message is taken, claimed,
        labeled and written, finished, or given up on (the fleet making progress)."""
        items = self._work_items()
        worker, delivery = items[pick % len(items)]
        if delivery is None:
            taken = self._take()
            if taken is not None:
                self._record_delivery(worker, taken)
        elif delivery.stage == "delivered":
            self._claim(worker, delivery)
        elif delivery.stage == "running":
            self._write(worker, delivery, errors)
        elif delivery.stage == "written":
            self._finish(worker, delivery)
        else:
            self._give_up(worker, delivery)

    @precondition(lambda self: bool(self._found("delivered")))
    @rule(pick=st.integers(0, 7))
    @counted
    def claim(self, pick: int) -> None:
        """The job claims its shard, as ShardJob.label does."""
        worker, delivery = self._pick(pick, "delivered")
        self._claim(worker, delivery)

    def _claim(self, worker: SimWorker, delivery: Delivery) -> None:
        try:
            paths = shard_source(delivery.output, delivery.shard)
        except ShardListError as exc:  # Refused(whole_run): the run is failed, the message acked
            self.ledger.fail_run(delivery.run, str(exc))
            self._ack(worker, delivery)
            return
        attempts = MAX_ATTEMPTS if "." not in delivery.shard else 1
        delivery.owner = f"{worker.name}@model#{next(self.numbers)}"
        claim = self.ledger.claim(delivery.run, delivery.shard, delivery.owner, LEASE_S, attempts, len(paths),
                                  held=len(worker.held()) + 1)  # fmt: skip
        STATS[f"claim {claim.verdict.value}"] += 1
        delivery.paths = paths
        if claim.verdict == Verdict.RUN:
            delivery.stage = "running"
        elif claim.verdict == Verdict.EXHAUSTED:
            delivery.stage = "exhausted"
        else:  # done, split, busy, run failed: Skipped, acked
            self._ack(worker, delivery)

    def _holding(self) -> list[SimWorker]:
        return [w for w in self.workers.values() if w.alive and w.held()]

    @precondition(lambda self: bool(self._holding()))
    @rule(pick=st.integers(0, 3))
    @counted
    def heartbeat(self, pick: int) -> None:
        """A worker's lease keeper renews every lease its process holds."""
        self._heartbeat(self._holding()[pick % len(self._holding())])

    def _heartbeat(self, worker: SimWorker) -> None:
        held = worker.held()
        for delivery in held:
            if not delivery.lost and self.ledger.renew(delivery.run, delivery.owner, [delivery.shard], LEASE_S,
                                                       held=len(held)):  # fmt: skip
                delivery.lost = True

    def _time_matters(self) -> bool:
        """A lease, a queued shard or a delivered message that time will change."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.ledger.leases)
        pipe.zcard(self.ledger.queued_index)
        pipe.zcount(UNACKED_INDEX, self.now - VISIBILITY_S, "+inf")
        return any(pipe.execute())

    @precondition(lambda self: self._time_matters())
    @rule(seconds=st.sampled_from([1.0, LEASE_S / 2, LEASE_S + 1, VISIBILITY_S + 1]))
    @counted
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: bool(self.ledger.lapsed(limit=1)))
    @rule()
    @counted
    def sweep(self) -> None:
        """A worker's sweeper requeues lapsed shards."""
        STATS["shards requeued by the sweeper"] += len(self.sweeper.sweep_once())

    def _reconciler_has_work(self) -> bool:
        if self.ledger.queued_since(ORPHAN_AFTER_S, limit=1):
            return True
        return any(
            self.ledger.status(run, QUEUE).finished(self.now) for run in self.ledger.runs_without_manifest()
        )

    @precondition(lambda self: self._reconciler_has_work())
    @rule()
    @counted
    def reconcile(self) -> None:
        """A worker's reconciler republishes queued shards without a message, writes manifests."""
        done = self.reconciler.reconcile_once()
        STATS["shards republished by the reconciler"] += len(done.republished)
        STATS["manifests written by the reconciler"] += len(done.manifests)

    @precondition(
        lambda self: (
            any(w.alive for w in self.workers.values())
            and self.client.zcount(UNACKED_INDEX, "-inf", self.now - VISIBILITY_S) > 0
        )
    )
    @rule()
    @counted
    def kombu_restore(self) -> None:
        """A live consumer's visibility sweep: unacked messages older than the visibility
        timeout go back to the queue (kombu's restore_visible: RPUSH, taken next). A living
        holder of one still runs it (Celery's duplicate after a visibility timeout)."""
        stale = self.client.zrangebyscore(UNACKED_INDEX, "-inf", self.now - VISIBILITY_S)
        for tag in stale:
            pipe = self.client.pipeline()
            pipe.hget(UNACKED, tag)
            pipe.hdel(UNACKED, tag)
            pipe.zrem(UNACKED_INDEX, tag)
            stored = pipe.execute()[0]
            if stored is not None:
                envelope, _exchange, routing_key = json.loads(stored)
                self.client.rpush(routing_key, json.dumps(envelope))
                STATS["messages restored by kombu"] += 1

    @precondition(lambda self: bool(self._found("running")))
    @rule(pick=st.integers(0, 7), errors=st.booleans())
    @counted
    def write_file(self, pick: int, errors: bool) -> None:
        """The job confirms its lease and writes the shard's file (its first image an error
        row if `errors`); a retried shard relabels only its error rows."""
        worker, delivery = self._pick(pick, "running")
        self._write(worker, delivery, errors)

    def _write(self, worker: SimWorker, delivery: Delivery, errors: bool) -> None:
        state = self.ledger.shard_state(delivery.run, delivery.shard)
        records: dict[str, dict] = {}
        todo = delivery.paths
        if state is not None and state.retry_codes is not None:
            try:
                records = {r["path"]: r for r in iter_records(delivery.output, shard_ids=[delivery.shard])}
            except DatasetError:  # the job raises: released, and Celery requeues the message
                STATS["retry found no file"] += 1
                self.ledger.release(delivery.run, delivery.shard, delivery.owner, uncount=False)
                self._reject_requeue(worker, delivery)
                return
            codes = set(state.retry_codes)
            todo = [p for p in delivery.paths
                    if p not in records or (is_error(records[p]) and (not codes or error_code(records[p]) in codes))]  # fmt: skip
        for index, path in enumerate(todo):
            records[path] = (error_record(path, ErrorCode.NOT_FOUND, "the mount was down") if errors and index == 0
                             else label_record(path, [{"index": 1, "label": "tench", "score": 0.5}]))  # fmt: skip
        if delivery.lost or self.ledger.renew(delivery.run, delivery.owner, [delivery.shard], LEASE_S,
                                              held=len(worker.held())):  # fmt: skip
            STATS["job found its lease lost"] += 1
            self._ack(worker, delivery)  # Skipped("lost"): writes nothing
            return
        delivery.file = write_shard(delivery.output, delivery.shard, [records[p] for p in delivery.paths], SPEC,
                                    worker=worker.name)  # fmt: skip
        delivery.stage = "written"

    @precondition(lambda self: bool(self._found("written")))
    @rule(pick=st.integers(0, 7), fate=st.integers(0, 3))
    @counted
    def finish(self, pick: int, fate: int) -> None:
        """The job marks its shard done and writes the manifest if the run is finished; with
        fate 3 its worker dies between the two (no manifest, no ack)."""
        worker, delivery = self._pick(pick, "written")
        self._finish(worker, delivery, die_before_manifest=fate == 3)

    def _finish(self, worker: SimWorker, delivery: Delivery, die_before_manifest: bool = False) -> None:
        assert delivery.file is not None
        if self.ledger.finish(
            delivery.run, delivery.shard, delivery.owner, delivery.file.labeled, delivery.file.failed
        ):
            self.seen_done[delivery.run].add(delivery.shard)
        else:
            STATS["finish refused (lease lost meanwhile)"] += 1
        if die_before_manifest:
            self._die(worker)
            return
        self._manifest(delivery.run)
        self._ack(worker, delivery)

    def _manifest(self, run: str) -> None:
        try:
            write_manifest_if_finished(self.ledger, run, QUEUE, SPEC, TOP_K)
        except DatasetError:  # the job logs it; the reconciler tries again
            STATS["manifest step failed"] += 1

    @precondition(lambda self: bool(self._found("running", "written")))
    @rule(pick=st.integers(0, 7), uncount=st.booleans())
    @counted
    def hand_back(self, pick: int, uncount: bool) -> None:
        """HandedBack (deadline, warm shutdown, engine failure): release, Reject(requeue)."""
        worker, delivery = self._pick(pick, "running", "written")
        self.ledger.release(delivery.run, delivery.shard, delivery.owner, uncount=uncount)
        self._reject_requeue(worker, delivery)

    @precondition(lambda self: bool(self._found("delivered", "running")) and not self._failed_runs())
    @rule(pick=st.integers(0, 7))
    @counted
    def refuse_run(self, pick: int) -> None:
        """Refused(whole_run) (output outside the roots, embeddings the bundle cannot give):
        the lease released uncounted, the run failed, the message acked."""
        worker, delivery = self._pick(pick, "delivered", "running")
        if delivery.stage == "running":
            self.ledger.release(delivery.run, delivery.shard, delivery.owner, uncount=True)
        self.ledger.fail_run(delivery.run, "refused for the whole run (model test)")
        self._ack(worker, delivery)

    @precondition(lambda self: bool(self._found("exhausted")))
    @rule(pick=st.integers(0, 7))
    @counted
    def give_up(self, pick: int) -> None:
        """A claim said exhausted: split the shard, or give its one image an error row (job._give_up)."""
        worker, delivery = self._pick(pick, "exhausted")
        self._give_up(worker, delivery)

    def _give_up(self, worker: SimWorker, delivery: Delivery) -> None:
        run, shard, paths = delivery.run, delivery.shard, delivery.paths
        if len(paths) > 1:
            parts = [(child, len(half), shard_message(run, child, delivery.output, QUEUE, origin="labeler-split"))
                     for child, half in zip(children(shard), halves(paths), strict=True)]  # fmt: skip
            STATS["splits"] += self.ledger.split(run, QUEUE, shard, parts)
            self._ack(worker, delivery)
            return
        claim = self.ledger.claim(run, shard, delivery.owner, LEASE_S, MAX_ATTEMPTS, 1, force=True)
        if claim.verdict != Verdict.RUN:
            self._ack(worker, delivery)
            return
        delivery.stage = "running"
        if self.ledger.renew(run, delivery.owner, [shard], LEASE_S, held=len(worker.held())):
            self._ack(worker, delivery)
            return
        record = error_record(paths[0], ErrorCode.INTERNAL_ERROR, "its worker was lost too often")
        delivery.file = write_shard(delivery.output, shard, [record], SPEC, worker=worker.name)
        if self.ledger.finish(run, shard, delivery.owner, 0, 1):
            self.seen_done[run].add(shard)
            self.ledger.dead_letter(run, shard, f"{paths[0]}: gave up")
            STATS["lone images given an error row"] += 1
        self._manifest(run)
        self._ack(worker, delivery)

    def _busy(self) -> list[SimWorker]:
        return [w for w in self.workers.values() if w.alive and w.deliveries]

    @precondition(lambda self: bool(self._busy()))
    @rule(pick=st.integers(0, 3))
    @counted
    def die(self, pick: int) -> None:
        """SIGKILL of a worker holding messages: they stay in `unacked`, its leases lapse later."""
        self._die(self._busy()[pick % len(self._busy())])

    def _die(self, worker: SimWorker) -> None:
        worker.alive = False
        worker.deliveries.clear()

    @precondition(lambda self: not all(w.alive for w in self.workers.values()))
    @rule(worker=st.sampled_from(WORKERS))
    @counted
    def start_worker(self, worker: str) -> None:
        """Its supervisor starts a fresh process."""
        self.workers[worker].alive = True

    # -- Redis itself -----------------------------------------------------------------------------

    @precondition(lambda self: self.steps - self.last_restart >= 6)
    @rule()
    @counted
    def restart_redis(self) -> None:
        """A clean restart (SIGTERM, AOF reloaded): nothing acknowledged is lost."""
        before = redis_contents(self.client)
        self.server.stop()
        self.server.start()
        self.client.connection_pool.disconnect()
        after = redis_contents(self.client)
        assert after == before, f"a restart lost or changed keys: {sorted(set(before) ^ set(after))}"
        self.last_restart = self.steps

    @precondition(
        lambda self: (
            (self.checkpoint_dir is None or self.steps_since_checkpoint > self.window)
            and self.steps - self.last_restart >= 6
        )
    )
    @rule()
    @counted
    def checkpoint(self) -> None:
        """Copy the AOF directory: what a host that dies within the next steps still has on disk."""
        # Every reply so far is written to the file (not fsynced): an everysec AOF may hold a
        # write back while a background fsync runs; the copy waits for it.
        wait_for(lambda: int(self.client.info("persistence")["aof_buffer_length"]) == 0, 10,
                 "the AOF buffer to be written", interval=0.01)  # fmt: skip
        self.checkpoint_dir = Path(tempfile.mkdtemp(prefix="aof-", dir=self.out))
        shutil.copytree(self.aof_dir, self.checkpoint_dir / "aof")
        self.steps_since_checkpoint = 0

    @property
    def aof_dir(self) -> Path:
        return self.server.data_dir / "appendonlydir"

    @precondition(lambda self: self.checkpoint_dir is not None and self.steps_since_checkpoint <= self.window)
    @rule()
    @counted
    def lose_last_writes(self) -> None:
        """The host dies: Redis comes back with the AOF as it was a few steps ago. Messages, acks,
        claims, finishes and runs written since are gone; the files on storage stay."""
        assert self.checkpoint_dir is not None and self.server.process is not None
        self.server.process.kill()
        self.server.process.wait(15)
        self.server.process = None
        shutil.rmtree(self.aof_dir)
        shutil.copytree(self.checkpoint_dir / "aof", self.aof_dir)
        self.server.start()
        self.client.connection_pool.disconnect()
        self.checkpoint_dir = None
        self.forgot = True
        self.last_restart = self.steps
        for run in RUNS:
            self.seen_done[run] = {s.shard_id for s in self.ledger.shard_states(run) if s.state == State.DONE}

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def ledger_and_storage_agree(self) -> None:
        try:
            for run in sorted(self.enqueued):
                self.check_run(run)
        except BaseException:
            self.broken = True
            raise

    def check_run(self, run: str) -> None:
        """After every step, for a run the ledger knows (after lost writes it may not):
        - coverage: its root shards (the stored list) and the halves of every split shard are in
          the ledger, and the leaves (not split) hold every image of the run exactly once;
        - no orphan: a queued leaf of a run that is not failed is in `P:queued` (the reconciler
          finds it there and republishes it when its message is gone); a running leaf has its
          entry in `P:leases` at its lease's expiry (the sweeper finds it when it lapses);
        - a done leaf has its file, with one row per path of the shard, and the ledger's rows
          and failed count for it are the file's (failed: unless writes were lost);
        - no path has two rows among the files of the leaves (a split parent's file is a
          stray the manifest step removes; it is not counted);
        - the run's counts are the sums over its leaves (images, shards) and done leaves (done,
          failed, shards_done);
        - a shard the model saw finished stays done unless `labeler retry` reopened it;
        - a finished, manifested run's manifest lists exactly its done leaves, with the
          footers' counts (unless writes were lost: the manifest may then be newer than the ledger)."""
        meta = {k.decode(): v.decode() for k, v in self.client.hgetall(self.ledger.keys(run).meta).items()}
        if "output" not in meta:
            assert self.forgot, f"run {run}: enqueued, but the ledger has no settings for it"
            return
        output = meta["output"]
        shards = {s.shard_id: s for s in self.ledger.shard_states(run)}
        index = read_index(output)
        assert index is not None, f"run {run}: enqueued, but its shard list has no index"
        leaves: list[ShardState] = []
        covered: list[str] = []

        def walk(shard_id: str) -> None:
            state = shards.get(shard_id)
            assert state is not None, f"run {run}: shard {shard_id} is missing from the ledger"
            if state.state == State.SPLIT:
                for child in children(shard_id):
                    walk(child)
                return
            leaves.append(state)
            covered.extend(shard_source(output, shard_id))

        for position in range(index["shards"]):
            walk(root_shard_id(position))
        assert covered == run_paths(run), f"run {run}: the live shards do not cover its images once each"
        failed_run = "failed_reason" in meta
        for state in leaves:
            member = lease_member(run, state.shard_id)
            if state.state == State.QUEUED and not failed_run:
                assert self.client.zscore(self.ledger.queued_index, member) is not None, (
                    f"run {run}: shard {state.shard_id} is queued but not in the queued index: an orphan"
                )
            if state.state == State.RUNNING:
                assert self.client.zscore(self.ledger.leases, member) == state.lease_until, (
                    f"run {run}: shard {state.shard_id} runs without its lease entry: the sweeper cannot find it"
                )
        files = shard_files(output)
        done = [s for s in leaves if s.state == State.DONE]
        for state in done:
            assert state.shard_id in files, f"run {run}: shard {state.shard_id} is done without a file"
            facts = file_facts(files[state.shard_id])
            assert sorted(facts.paths) == sorted(shard_source(output, state.shard_id)), (
                f"run {run}: shard {state.shard_id}'s file does not hold one row per path"
            )
            assert facts.rows == state.images, (
                f"run {run}: shard {state.shard_id}: {facts.rows} rows, {state.images} images"
            )
            if not self.forgot:
                assert facts.failed == state.failed, (
                    f"run {run}: shard {state.shard_id}: its file has {facts.failed} failed rows, the ledger says {state.failed}"
                )
        seen: Counter[str] = Counter()
        for state in leaves:
            if state.shard_id in files:
                seen.update(file_facts(files[state.shard_id]).paths)
        twice = sorted(path for path, count in seen.items() if count > 1)
        assert not twice, f"run {run}: paths with two rows among the live shards' files: {twice}"
        counts = {key: int(meta.get(key, 0)) for key in ("images", "shards", "done", "failed", "shards_done")}
        expected = {"images": sum(s.images for s in leaves), "shards": len(leaves),
                    "done": sum(s.images for s in done), "failed": sum(s.failed for s in done),
                    "shards_done": len(done)}  # fmt: skip
        assert counts == expected, f"run {run}: counts {counts}, the shards say {expected}"
        done_ids = {s.shard_id for s in done}
        assert self.seen_done[run] <= done_ids, (
            f"run {run}: finished shards no longer done: {self.seen_done[run] - done_ids}"
        )
        status = self.ledger.status(run, QUEUE)
        if (
            status.manifest_at is not None
            and status.finished(self.now)
            and not failed_run
            and not self.forgot
        ):
            self.check_manifest(run, output, done_ids, files)

    def check_manifest(self, run: str, output: str, done_ids: set[str], files: dict[str, Path]) -> None:
        manifest = read_manifest(output)
        assert manifest is not None, f"run {run}: marked manifested, but {output} has no manifest"
        listed = {entry["id"]: entry for entry in manifest["shards"]}
        assert set(listed) == done_ids, (
            f"run {run}: the manifest lists {sorted(listed)}, done are {sorted(done_ids)}"
        )
        for shard_id, entry in listed.items():
            assert shard_id in files, f"run {run}: the manifest lists {shard_id}, which has no file"
            facts = file_facts(files[shard_id])
            assert (entry["rows"], entry["failed"]) == (facts.rows, facts.failed), (
                f"run {run}: the manifest says shard {shard_id} has {entry['rows']} rows, {entry['failed']} failed; "
                f"its file {facts.rows}, {facts.failed}"
            )

    # -- the end: a fault-free fleet drains the runs ----------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.drain()
        finally:
            shutil.rmtree(self.out, ignore_errors=True)
            with suppress(redis.RedisError):
                self.client.close()

    def drain(self, rounds: int = 30) -> None:
        """Workers come back, nothing fails any more, a person enqueues again a run that is failed
        or that the ledger forgot; time passes for sweeps and the reconciler. Then every run is
        finished, its manifest lists every done shard, every image has exactly one row among
        the files the manifest lists, and no other shard file is left for a glob reader."""
        for sim in self.workers.values():
            sim.alive = True
        worker = self.workers[WORKERS[0]]
        for round_number in range(rounds):
            for run in sorted(self.enqueued):
                meta = self.client.hmget(self.ledger.keys(run).meta, ["output", "failed_reason"])
                if meta[0] is None or meta[1] is not None:
                    STATS["drain: enqueued again (failed, or forgotten by the ledger)"] += 1
                    self._enqueue(run)
            for sim in self.workers.values():
                for delivery in list(sim.deliveries):
                    self._work_off(sim, delivery)
            while (delivery := self._take()) is not None:
                self._record_delivery(worker, delivery)
                self._work_off(worker, delivery)
            if self._all_manifested():
                STATS["drains"] += 1
                STATS["drain rounds"] += round_number + 1
                break
            self.now += LEASE_S + ORPHAN_AFTER_S + 1
            self.sweeper.sweep_once()
            self.reconciler.reconcile_once()
        else:
            raise AssertionError(f"the runs did not finish in {rounds} drain rounds: {self._summary()}")
        for run in sorted(self.enqueued):
            self.check_run(run)
            self.check_end(run)

    def _work_off(self, worker: SimWorker, delivery: Delivery) -> None:
        """Take one job through to its end with nothing failing."""
        if delivery.stage == "delivered":
            self._claim(worker, delivery)
        if delivery.stage == "exhausted":
            self._give_up(worker, delivery)
            return
        if delivery.stage == "running":
            self._write(worker, delivery, errors=False)
        if delivery.stage == "written" and delivery in worker.deliveries:
            self._finish(worker, delivery)

    def _all_manifested(self) -> bool:
        for run in self.enqueued:
            status = self.ledger.status(run, QUEUE)
            if status.failed_run or not status.finished(self.now) or status.manifest_at is None:
                return False
        return self.client.llen(QUEUE) == 0

    def _summary(self) -> dict[str, Any]:
        return {
            run: {s.shard_id: s.state.value for s in self.ledger.shard_states(run)}
            for run in sorted(self.enqueued)
        }

    def check_end(self, run: str) -> None:
        output = self.ledger.run_settings(run)["output"]
        manifest = read_manifest(output)
        assert manifest is not None, f"run {run}: finished without a manifest"
        done_ids = {s.shard_id for s in self.ledger.shard_states(run) if s.state == State.DONE}
        listed = [entry["id"] for entry in manifest["shards"]]
        assert set(listed) == done_ids, (
            f"run {run}: the manifest lists {sorted(listed)}, done are {sorted(done_ids)}"
        )
        rows = Counter(r["path"] for r in iter_records(output, shard_ids=listed))
        assert sorted(rows) == run_paths(run), (
            f"run {run}: images without a row: {sorted(set(run_paths(run)) - set(rows))}"
        )
        assert max(rows.values()) == 1, (
            f"run {run}: images with two rows: {[p for p, n in rows.items() if n > 1]}"
        )
        files = shard_files(output)
        assert set(files) == set(listed), (
            f"run {run}: shard files not in the manifest: {sorted(set(files) - set(listed))}"
        )
        for entry in manifest["shards"]:
            assert (entry["rows"], entry["failed"]) == file_counts(files[entry["id"]]), (
                f"run {run}: the manifest's counts of shard {entry['id']} are not its file's"
            )
        status = self.ledger.status(run, QUEUE)
        assert status.done == status.total == len(run_paths(run))
        if not self.forgot:
            assert status.failed == manifest["counts"]["failed"], (
                f"run {run}: the ledger counts {status.failed} failed, the manifest {manifest['counts']['failed']}"
            )
        assert run not in self.ledger.runs_without_manifest()


def machine_for(server: RedisServer, root: Path, window: int = CHECKPOINT_WINDOW) -> type[LedgerMachine]:
    """The machine bound to a running redis-server and a folder for the examples' outputs;
    `window`: how many steps of writes a host that dies may lose at most."""
    return type("LedgerModel", (LedgerMachine,), {"server": server, "root": root, "window": window})


def timed_run(server: RedisServer, root: Path, examples: int, steps: int, window: int = CHECKPOINT_WINDOW,
              derandomize: bool = False) -> float:  # fmt: skip
    """Run the machine `examples` times of up to `steps` steps; returns the seconds it took."""
    from hypothesis.stateful import run_state_machine_as_test

    started = time.perf_counter()
    run_state_machine_as_test(
        machine_for(server, root, window), settings=ci_settings(examples, steps, derandomize)
    )
    return time.perf_counter() - started


def replay(machine: LedgerMachine, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run rules by name as Hypothesis prints a failing example (`state.claim(pick=2)`), after
    the initialize rule, checking the invariants after each, then the teardown's drain."""
    machine.first_enqueue()
    machine.ledger_and_storage_agree()
    try:
        for name, arguments in steps:
            getattr(machine, name)(**arguments)
            machine.ledger_and_storage_agree()
    finally:
        machine.teardown()
