"""The run ledger in Redis: per run and per shard only, never per image.

A shard's state is one small JSON value in the run's `shards` hash (ledger/keys.py):
`{"s": state, "n": images, "l": labeled, "f": failed, "a": attempts, "o": owner, "u": lease until}`,
state one of `queued`, `running`, `done`, `split`. Every transition is one Lua script, so two
workers, a sweeper and a client can never both win one:

- claim: a worker takes a queued shard, or one whose lease lapsed (its worker was lost), and holds
  it under a lease it renews by heartbeat; a done or split shard, or one another living worker
  holds, is skipped (a redelivered or duplicated message costs nothing);
- finish: only the lease holder marks its shard done, after its Parquet file is durable, and the
  run's counts move once;
- requeue_lapsed: any worker's sweeper puts a shard whose lease lapsed back at the front of the
  queue (state and message in one step, so nothing is lost between them);
- split: a shard that has used its attempts, and that no living worker holds, is bisected; its
  halves are queued in its place;
- republish: the reconciler gives a message to a queued shard whose message was lost.

No orphans: a shard is done, split, running under a lease (the sweeper requeues it when the lease
lapses), or queued and listed in `P:queued` with the time it was last given a message; the
reconciler (celery_worker/reconcile.py) republishes those whose message is gone. A failed run's
shards wait, queued, until the run is enqueued again.

The run's `meta` hash keeps the totals (images, done, failed, shards, shards_done) and settings
(output, shard size, options), so a finished run costs a few bytes per image at most.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.ledger.keys import (
    RunKeys,
    lease_member,
    leases_key,
    open_runs_key,
    parse_lease_member,
    queued_key,
    runs_key,
)
from worker.ledger.scripts import register_all
from worker.ledger.states import Registered, State, Verdict
from worker.records import compact_json
from worker.setting_table import default


def _texts(replies: list) -> list[str]:
    """A Lua script's list reply as strings (redis-py gives bytes, or str with decode_responses)."""
    return [reply.decode() if isinstance(reply, bytes) else reply for reply in replies]


@dataclass(frozen=True)
class ShardState:
    shard_id: str
    state: State
    images: int
    labeled: int
    failed: int
    attempts: int
    owner: str | None
    lease_until: float | None
    retry_codes: tuple[str, ...] | None = None  # a reopened shard: relabel only errors with these
    losses: int = 0  # times its lease lapsed (its worker was lost), counted or not

    @classmethod
    def decode(cls, shard_id: str, raw: bytes | str) -> ShardState:
        data = json.loads(raw)
        codes = json.loads(data["r"]) if isinstance(data.get("r"), str) else None
        return cls(
            shard_id=shard_id,
            state=State(data["s"]),
            images=int(data["n"]),
            labeled=int(data.get("l", 0)),
            failed=int(data.get("f", 0)),
            attempts=int(data.get("a", 0)),
            losses=int(data.get("k", 0)),
            owner=data.get("o"),
            lease_until=float(data["u"]) if data.get("u") is not None else None,
            retry_codes=tuple(codes) if codes is not None else None,
        )


@dataclass(frozen=True)
class Claim:
    verdict: Verdict
    attempts: int


@dataclass(frozen=True)
class RunStatus:
    run: str
    total: int
    done: int
    failed: int
    shards: int
    shards_done: int
    queued_jobs: int
    created_at: float | None
    first_record_at: float | None
    last_record_at: float | None
    enqueuing_until: float | None = None
    output: str | None = None
    dead_jobs: int = 0  # shards given up on: their images have internal_error rows (worker lost)
    failed_reason: str | None = None  # the run is failed: why (a job refused for the whole run)
    failed_at: float | None = None
    manifest_at: float | None = None

    def enqueuing(self, now: float | None = None) -> bool:
        """An enqueue of this run is still adding shards (its lease has not run out)."""
        return self.enqueuing_until is not None and self.enqueuing_until > (now or time.time())

    def finished(self, now: float | None = None) -> bool:
        """Every shard is done and no enqueue is adding more (an empty run is finished too). Shards
        as well as images: a container shard's images are counted only once it is read."""
        return self.pending == 0 and self.shards_done >= self.shards and not self.enqueuing(now)

    @property
    def failed_run(self) -> bool:
        """A job was refused for a reason that holds for the whole run: nothing runs until it is
        enqueued again (after its cause is fixed)."""
        return self.failed_reason is not None

    def settled(self, now: float | None = None) -> bool:
        """Nothing more will happen without a person: finished, or failed."""
        return self.finished(now) or self.failed_run

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done)

    @property
    def labeled(self) -> int:
        return self.done - self.failed

    def average_rate(self) -> float:
        """Images per second from the first shard taken to the last one finished."""
        if not self.first_record_at or not self.last_record_at or self.done < 2:
            return 0.0
        span = self.last_record_at - self.first_record_at
        return self.done / span if span > 0 else 0.0


class RunLedger:
    """Reads and writes of runs and their shards. Thread-safe: redis-py clients share a pool.
    `clock` gives the time every lease and index entry is measured in (a test's own clock)."""

    def __init__(self, client: redis.Redis, prefix: str = default("key_prefix"),
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._scripts = register_all(client)

    def _now(self) -> str:
        return repr(self.clock())

    def keys(self, run: str) -> RunKeys:
        return RunKeys(self.prefix, run)

    @property
    def leases(self) -> str:
        return leases_key(self.prefix)

    @property
    def queued_index(self) -> str:
        return queued_key(self.prefix)

    @property
    def open_runs(self) -> str:
        return open_runs_key(self.prefix)

    # -- the run ----------------------------------------------------------------------------------

    def create_run(
        self, run: str, output: str, shard_size: int, options: dict[str, Any], queue: str
    ) -> dict[str, str]:
        """Register the run (once: a later enqueue keeps the first one's output and options) and
        return its settings as stored. An enqueue also clears a failure: the run may go on."""
        meta = self.keys(run).meta
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(runs_key(self.prefix), run)
        pipe.sadd(self.open_runs, run)
        pipe.hsetnx(meta, "created_at", self._now())
        pipe.hsetnx(meta, "output", output)
        pipe.hsetnx(meta, "shard_size", str(shard_size))
        pipe.hsetnx(meta, "options", compact_json(options))
        pipe.hset(meta, "queue", queue)
        pipe.hdel(meta, "failed_reason", "failed_at", "manifest_at")
        pipe.hmget(meta, ["output", "shard_size", "options"])
        stored = pipe.execute()[-1]
        return {"output": stored[0].decode(), "shard_size": stored[1].decode(), "options": stored[2].decode()}

    def run_settings(self, run: str) -> dict[str, Any] | None:
        """The run's output and options as its first enqueue stored them (None: no such run)."""
        output, options, queue = self.client.hmget(self.keys(run).meta, ["output", "options", "queue"])
        if output is None:
            return None
        return {"output": output.decode(), "options": json.loads(options) if options else {},
                "queue": queue.decode() if queue else None}  # fmt: skip

    def exists(self, run: str) -> bool:
        return bool(self.client.hexists(self.keys(run).meta, "output"))

    def fail_run(self, run: str, reason: str) -> bool:
        """Mark the run failed (the first reason stays); True if this call failed it. Its shards
        stay queued; `labeler enqueue --run RUN` clears the failure and they go on."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self.keys(run).meta, "failed_reason", reason)
        pipe.hsetnx(self.keys(run).meta, "failed_at", self._now())
        return bool(pipe.execute()[0])

    def renew_enqueue_lease(self, run: str, lease_s: float) -> None:
        """Say an enqueue is adding shards for `lease_s` more seconds, so `status --watch` and
        `enqueue --wait` do not take a run whose workers caught up between batches for finished."""
        self.client.hset(self.keys(run).meta, "enqueuing_until", repr(self.clock() + lease_s))

    def end_enqueue_lease(self, run: str) -> None:
        self.client.hdel(self.keys(run).meta, "enqueuing_until")

    def mark_manifested(self, run: str) -> None:
        """The run's manifest is written: the reconciler stops looking at it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys(run).meta, "manifest_at", self._now())
        pipe.srem(self.open_runs, run)
        pipe.execute()

    def runs_without_manifest(self) -> list[str]:
        return sorted(member.decode() for member in self.client.smembers(self.open_runs))

    def forget_run(self, run: str) -> None:
        """Drop what the fleet-wide keys still hold of a run whose own keys are gone (deleted)."""
        self.client.srem(self.open_runs, run)

    def known_shards(self, run: str, shard_ids: Sequence[str]) -> list[bool]:
        """Whether the ledger has each of these shards (an enqueue reads storage for the others)."""
        if not shard_ids:
            return []
        return [raw is not None for raw in self.client.hmget(self.keys(run).shards, list(shard_ids))]

    def register_shards(self, run: str, shards: Sequence[tuple[str, int]],
                        on_storage: dict[str, tuple[int, int]] | None = None) -> list[Registered]:  # fmt: skip
        """Add shards (id, images) not yet known; returns each one's state: the caller publishes
        the QUEUED and LAPSED ones. `on_storage`: (rows, failed) of shard files already written,
        read from their footers: a new shard whose file holds one row per image is done."""
        if not shards:
            return []
        on_storage = on_storage or {}
        args: list[Any] = [self._now(), run]
        for shard_id, images in shards:
            rows, failed = on_storage.get(shard_id, (-1, 0))
            args += [shard_id, images, rows, failed]
        keys = self.keys(run)
        states = self._scripts["register"](keys=[keys.shards, keys.meta, self.queued_index], args=args)
        return [Registered(state) for state in _texts(states)]

    def status(self, run: str, queue: str) -> RunStatus:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys(run).meta)
        pipe.llen(self.keys(run).dead)
        pipe.llen(queue)
        meta, dead, queued = pipe.execute()
        meta = {k.decode(): v.decode() for k, v in meta.items()}

        def number(name: str) -> float | None:
            return float(meta[name]) if name in meta else None

        return RunStatus(
            run=run,
            total=int(meta.get("images", 0)),
            done=int(meta.get("done", 0)),
            failed=int(meta.get("failed", 0)),
            shards=int(meta.get("shards", 0)),
            shards_done=int(meta.get("shards_done", 0)),
            queued_jobs=int(queued),
            created_at=number("created_at"),
            first_record_at=number("first_record_at"),
            last_record_at=number("last_record_at"),
            enqueuing_until=number("enqueuing_until"),
            output=meta.get("output"),
            dead_jobs=int(dead),
            failed_reason=meta.get("failed_reason"),
            failed_at=number("failed_at"),
            manifest_at=number("manifest_at"),
        )

    def shard_states(self, run: str, batch: int = 1000) -> Iterator[ShardState]:
        for shard_id, raw in self.client.hscan_iter(self.keys(run).shards, count=batch):
            yield ShardState.decode(shard_id.decode(), raw)

    def shard_state(self, run: str, shard_id: str) -> ShardState | None:
        raw = self.client.hget(self.keys(run).shards, shard_id)
        return ShardState.decode(shard_id, raw) if raw else None

    # -- a worker's shard -------------------------------------------------------------------------

    def claim(self, run: str, shard_id: str, owner: str, lease_s: float, max_attempts: int, images: int,
              force: bool = False, max_losses: int | None = None, held: int = 1,
              register: bool = False) -> Claim:  # fmt: skip
        """Take the shard under a lease. `max_losses` (default three times `max_attempts`) bounds
        how often it may be lost with its worker before it counts as exhausted; `held`: shards
        the worker holds with this one; `register`: add the shard if the ledger does not know it
        (a service's own shard, submitted with its paths), else it answers UNKNOWN."""
        keys = self.keys(run)
        losses = max_losses if max_losses is not None else 3 * max_attempts
        verdict, attempts = self._scripts["claim"](
            keys=[keys.shards, self.leases, keys.meta, self.queued_index],
            args=[shard_id, owner, self._now(), lease_s, max_attempts, images, "1" if force else "0",
                  lease_member(run, shard_id), losses, held, "1" if register else "0"],
        )  # fmt: skip
        return Claim(Verdict(_texts([verdict])[0]), int(attempts))

    def renew(self, run: str, owner: str, shard_ids: Sequence[str], lease_s: float, held: int = 1) -> list[str]:
        """Renew `owner`'s leases; returns the shards it no longer holds. `held`: how many shards
        the owner's worker holds now (a lapse of a worker holding several spends no attempt)."""
        if not shard_ids:
            return []
        pairs = [item for shard_id in shard_ids for item in (shard_id, lease_member(run, shard_id))]
        lost = self._scripts["renew"](keys=[self.keys(run).shards, self.leases],
                                      args=[owner, self._now(), lease_s, held, *pairs])  # fmt: skip
        return _texts(lost)

    def finish(self, run: str, shard_id: str, owner: str, labeled: int, failed: int) -> bool:
        """Mark the shard done (only its lease holder can); False: the lease was lost meanwhile."""
        keys = self.keys(run)
        args = [shard_id, owner, self._now(), labeled, failed, lease_member(run, shard_id)]
        return bool(self._scripts["finish"](keys=[keys.shards, self.leases, keys.meta, self.queued_index], args=args))

    def release(self, run: str, shard_id: str, owner: str, uncount: bool) -> bool:
        """Give a held shard back to the queue (the caller requeues its message)."""
        args = [shard_id, owner, "1" if uncount else "0", lease_member(run, shard_id), self._now()]
        return bool(self._scripts["release"](keys=[self.keys(run).shards, self.leases, self.queued_index], args=args))

    def lapsed(self, limit: int = 100) -> list[tuple[str, str]]:
        """(run, shard) of the longest-lapsed shards, of any run, whose lease ran out (their worker
        was lost or cut off)."""
        members = self.client.zrangebyscore(self.leases, "-inf", self._now(), start=0, num=limit)
        return [parse_lease_member(m.decode()) for m in members]

    def drop_lease_entries(self, run: str, shard_ids: Sequence[str]) -> None:
        """Remove lease and queued-index entries of a run that no longer exists (deleted)."""
        members = [lease_member(run, shard) for shard in shard_ids]
        if members:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.leases, *members)
            pipe.zrem(self.queued_index, *members)
            pipe.execute()

    def requeue_lapsed(self, run: str, queue: str, messages: Sequence[tuple[str, str]]) -> list[str]:
        """Put these lapsed shards (id, message) of `run` back at the front of the queue. One whose
        worker held several shards spends no attempt: a lost worker is not evidence against any
        one of them (it still counts as a loss)."""
        if not messages:
            return []
        args: list[Any] = [self._now()]
        for shard_id, message in messages:
            args += [shard_id, lease_member(run, shard_id), message]
        keys = [self.keys(run).shards, self.leases, queue, self.queued_index]
        return _texts(self._scripts["requeue_lapsed"](keys=keys, args=args))

    def split(self, run: str, queue: str, parent: str, halves: Sequence[tuple[str, int, str]]) -> bool:
        """Replace `parent` by its halves (id, images, message), queued at the front. False: not
        split, as it is done, split already, or held under a live lease by another worker."""
        keys = self.keys(run)
        args: list[Any] = [parent, run, self._now()]
        for child, images, message in halves:
            args += [child, images, message]
        return bool(self._scripts["split"](keys=[keys.shards, keys.meta, queue, self.queued_index], args=args))

    def dead_letter(self, run: str, shard_id: str, reason: str) -> None:
        """Remember a shard given up on (its images got error rows), for status and the report."""
        entry = {"shard": shard_id, "run": run, "reason": reason, "at": self.clock()}
        self.client.rpush(self.keys(run).dead, compact_json(entry))

    def dead_letters(self, run: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.keys(run).dead, 0, -1)]

    def reopen(self, run: str, shard_ids: Sequence[str], codes: Sequence[str]) -> list[str]:
        """Put done shards with failed images back to queued, to relabel their errors (`codes`,
        or every error when empty); returns the shards reopened."""
        if not shard_ids:
            return []
        keys = self.keys(run)
        args = [compact_json(list(codes)), run, self._now(), *shard_ids]
        reopened = _texts(self._scripts["reopen"](keys=[keys.shards, keys.meta, self.queued_index], args=args))
        if reopened:  # the run is open again: its manifest is rewritten when it finishes again
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(self.open_runs, run)
            pipe.hdel(keys.meta, "manifest_at")
            pipe.execute()
        return reopened

    # -- the reconciler ---------------------------------------------------------------------------

    def queued_since(self, older_than_s: float, limit: int = 500) -> list[tuple[str, str]]:
        """(run, shard) of queued shards last given a message (or seen to have one) more than
        `older_than_s` ago: the candidates for an orphan."""
        cutoff = repr(self.clock() - older_than_s)
        members = self.client.zrangebyscore(self.queued_index, "-inf", cutoff, start=0, num=limit)
        return [parse_lease_member(m.decode()) for m in members]

    def seen_with_message(self, run: str, shard_ids: Sequence[str]) -> None:
        """These queued shards have a message: look again in a while."""
        if shard_ids:
            now = self.clock()
            self.client.zadd(self.queued_index, {lease_member(run, shard): now for shard in shard_ids})

    def republish(self, run: str, queue: str, messages: Sequence[tuple[str, str]]) -> list[str]:
        """Give these queued shards (id, message) a message; returns those that were still queued."""
        if not messages:
            return []
        args: list[Any] = [self._now()]
        for shard_id, message in messages:
            args += [shard_id, lease_member(run, shard_id), message]
        return _texts(self._scripts["republish"](keys=[self.keys(run).shards, queue, self.queued_index], args=args))
