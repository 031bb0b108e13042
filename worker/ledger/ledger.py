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
- split: a shard that has used its attempts is bisected; its halves are queued in its place.

The run's `meta` hash keeps the totals (images, done, failed, shards, shards_done) and settings
(output, shard size, options), so a finished run costs a few bytes per image at most.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.ledger.keys import RunKeys, lease_member, leases_key, parse_lease_member, runs_key
from worker.records import compact_json

# KEYS: shards, meta. ARGV: now, then (shard id, images) pairs. New shards only; returns, per pair,
# the shard's state after the call ("queued" for new ones), so the caller publishes what needs it.
_REGISTER = """
local states = {}
local added, images = 0, 0
for i = 2, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local state = cjson.decode(old)
    if state['s'] == 'running' and tonumber(state['u']) <= tonumber(ARGV[1]) then
      states[#states + 1] = 'lapsed'
    else
      states[#states + 1] = state['s']
    end
  else
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode({s = 'queued', n = tonumber(ARGV[i + 1]), a = 0}))
    added = added + 1
    images = images + tonumber(ARGV[i + 1])
    states[#states + 1] = 'queued'
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'shards', added)
  redis.call('HINCRBY', KEYS[2], 'images', images)
end
return states
"""

# KEYS: shards, leases, meta. ARGV: shard, owner, now, lease_s, max_attempts, images, force, lease member.
# Returns {verdict, attempts}: run (taken), done, split, busy (another living worker holds it),
# exhausted (attempts used up: split it, or, one image left, take it with force to write its error).
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local now = tonumber(ARGV[3])
local state
if raw then
  state = cjson.decode(raw)
else
  state = {s = 'queued', n = tonumber(ARGV[6]), a = 0}
  redis.call('HINCRBY', KEYS[3], 'shards', 1)
  redis.call('HINCRBY', KEYS[3], 'images', tonumber(ARGV[6]))
end
if state['s'] == 'done' or state['s'] == 'split' then return {state['s'], state['a']} end
if state['s'] == 'running' and state['o'] ~= ARGV[2] and tonumber(state['u']) > now then
  return {'busy', state['a']}
end
if ARGV[7] ~= '1' then
  if state['a'] >= tonumber(ARGV[5]) then return {'exhausted', state['a']} end
  state['a'] = state['a'] + 1
end
state['s'] = 'running'
state['o'] = ARGV[2]
state['u'] = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZADD', KEYS[2], state['u'], ARGV[8])
redis.call('HSETNX', KEYS[3], 'first_record_at', ARGV[3])
return {'run', state['a']}
"""

# KEYS: shards, leases. ARGV: owner, now, lease_s, then (shard, lease member) pairs. Renews the
# ones `owner` still holds; returns those it lost (done by another after a lapse, or taken over).
_RENEW = """
local lost = {}
local expires = tonumber(ARGV[2]) + tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == 'running' and state['o'] == ARGV[1] then
    state['u'] = expires
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    redis.call('ZADD', KEYS[2], expires, ARGV[i + 1])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# KEYS: shards, leases, meta. ARGV: shard, owner, now, labeled, failed, lease member. Only the
# holder finishes.
_FINISH = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local state = cjson.decode(raw)
if state['s'] ~= 'running' or state['o'] ~= ARGV[2] then return 0 end
state['s'] = 'done'
state['l'] = tonumber(ARGV[4])
state['f'] = tonumber(ARGV[5])
state['o'] = nil
state['u'] = nil
state['r'] = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('HINCRBY', KEYS[3], 'done', state['n'])
redis.call('HINCRBY', KEYS[3], 'failed', state['f'])
redis.call('HINCRBY', KEYS[3], 'shards_done', 1)
redis.call('HSET', KEYS[3], 'last_record_at', ARGV[3])
return 1
"""

# KEYS: shards, leases. ARGV: shard, owner, uncount ('1': the worker failed, not the shard), member.
_RELEASE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local state = cjson.decode(raw)
if state['s'] ~= 'running' or state['o'] ~= ARGV[2] then return 0 end
state['s'] = 'queued'
state['o'] = nil
state['u'] = nil
if ARGV[3] == '1' and state['a'] > 0 then state['a'] = state['a'] - 1 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZREM', KEYS[2], ARGV[4])
return 1
"""

# KEYS: shards, leases, queue. ARGV: now, then (shard, lease member, message) triples. A shard still
# running on a lapsed lease goes back to queued and its message to the front of the queue, in one step.
_REQUEUE_LAPSED = """
local requeued = {}
local now = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == 'running' and tonumber(state['u']) <= now then
    state['s'] = 'queued'
    state['o'] = nil
    state['u'] = nil
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    redis.call('RPUSH', KEYS[3], ARGV[i + 2])
    requeued[#requeued + 1] = ARGV[i]
  end
  if not state or state['s'] ~= 'running' or tonumber(state['u']) <= now then
    redis.call('ZREM', KEYS[2], ARGV[i + 1])
  end
end
return requeued
"""

# KEYS: shards, meta, queue. ARGV: parent, then (child, images, message) triples. Only a shard
# that is not running, done or split already is split; its halves go to the front of the queue.
_SPLIT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local parent = cjson.decode(raw)
if parent['s'] == 'done' or parent['s'] == 'split' then return 0 end
parent['s'] = 'split'
parent['o'] = nil
parent['u'] = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(parent))
local added = 0
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], cjson.encode({s = 'queued', n = tonumber(ARGV[i + 1]), a = 0})) == 1 then
    added = added + 1
  end
  redis.call('RPUSH', KEYS[3], ARGV[i + 2])
end
redis.call('HINCRBY', KEYS[2], 'shards', added - 1)
return 1
"""

# KEYS: shards, meta. ARGV: codes JSON, then shard ids. A done shard with failed images goes back
# to queued, out of the done counts, remembering which codes to retry; returns the ids reopened.
_REOPEN = """
local reopened = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == 'done' and (state['f'] or 0) > 0 then
    redis.call('HINCRBY', KEYS[2], 'done', -state['n'])
    redis.call('HINCRBY', KEYS[2], 'failed', -state['f'])
    redis.call('HINCRBY', KEYS[2], 'shards_done', -1)
    state['s'] = 'queued'
    state['a'] = 0
    state['r'] = ARGV[1]
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    reopened[#reopened + 1] = ARGV[i]
  end
end
return reopened
"""


def _texts(replies: list) -> list[str]:
    """A Lua script's list reply as strings (redis-py gives bytes, or str with decode_responses)."""
    return [reply.decode() if isinstance(reply, bytes) else reply for reply in replies]


@dataclass(frozen=True)
class ShardState:
    shard_id: str
    state: str
    images: int
    labeled: int
    failed: int
    attempts: int
    owner: str | None
    lease_until: float | None
    retry_codes: tuple[str, ...] | None = None  # a reopened shard: relabel only errors with these

    @classmethod
    def decode(cls, shard_id: str, raw: bytes | str) -> ShardState:
        data = json.loads(raw)
        codes = json.loads(data["r"]) if isinstance(data.get("r"), str) else None
        return cls(
            shard_id=shard_id,
            state=data["s"],
            images=int(data["n"]),
            labeled=int(data.get("l", 0)),
            failed=int(data.get("f", 0)),
            attempts=int(data.get("a", 0)),
            owner=data.get("o"),
            lease_until=float(data["u"]) if data.get("u") is not None else None,
            retry_codes=tuple(codes) if codes is not None else None,
        )


@dataclass(frozen=True)
class Claim:
    verdict: str  # run, done, split, busy, exhausted
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

    def enqueuing(self, now: float | None = None) -> bool:
        """An enqueue of this run is still adding shards (its lease has not run out)."""
        return self.enqueuing_until is not None and self.enqueuing_until > (now or time.time())

    def finished(self, now: float | None = None) -> bool:
        """Every shard is done and no enqueue is adding more (an empty run is finished too)."""
        return self.pending == 0 and not self.enqueuing(now)

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
    """Reads and writes of runs and their shards. Thread-safe: redis-py clients share a pool."""

    def __init__(self, client: redis.Redis, prefix: str = "labeler") -> None:
        self.client = client
        self.prefix = prefix
        self._register = client.register_script(_REGISTER)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._requeue = client.register_script(_REQUEUE_LAPSED)
        self._split = client.register_script(_SPLIT)
        self._reopen = client.register_script(_REOPEN)

    def keys(self, run: str) -> RunKeys:
        return RunKeys(self.prefix, run)

    @property
    def leases(self) -> str:
        return leases_key(self.prefix)

    # -- the run ----------------------------------------------------------------------------------

    def create_run(
        self, run: str, output: str, shard_size: int, options: dict[str, Any], queue: str
    ) -> dict[str, str]:
        """Register the run (once: a later enqueue keeps the first one's output and options) and
        return its settings as stored."""
        meta = self.keys(run).meta
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(runs_key(self.prefix), run)
        pipe.hsetnx(meta, "created_at", repr(time.time()))
        pipe.hsetnx(meta, "output", output)
        pipe.hsetnx(meta, "shard_size", str(shard_size))
        pipe.hsetnx(meta, "options", compact_json(options))
        pipe.hset(meta, "queue", queue)
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

    def renew_enqueue_lease(self, run: str, lease_s: float) -> None:
        """Say an enqueue is adding shards for `lease_s` more seconds, so `status --watch` and
        `enqueue --wait` do not take a run whose workers caught up between batches for finished."""
        self.client.hset(self.keys(run).meta, "enqueuing_until", repr(time.time() + lease_s))

    def end_enqueue_lease(self, run: str) -> None:
        self.client.hdel(self.keys(run).meta, "enqueuing_until")

    def register_shards(self, run: str, shards: Sequence[tuple[str, int]]) -> list[str]:
        """Add shards (id, images) not yet known; returns each one's state (queued, running,
        lapsed, done, split): the caller publishes the queued and lapsed ones."""
        if not shards:
            return []
        args: list[Any] = [repr(time.time())]
        for shard_id, images in shards:
            args += [shard_id, images]
        states = self._register(keys=[self.keys(run).shards, self.keys(run).meta], args=args)
        return _texts(states)

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
        )

    def shard_states(self, run: str, batch: int = 1000) -> Iterator[ShardState]:
        for shard_id, raw in self.client.hscan_iter(self.keys(run).shards, count=batch):
            yield ShardState.decode(shard_id.decode(), raw)

    def shard_state(self, run: str, shard_id: str) -> ShardState | None:
        raw = self.client.hget(self.keys(run).shards, shard_id)
        return ShardState.decode(shard_id, raw) if raw else None

    # -- a worker's shard -------------------------------------------------------------------------

    def claim(self, run: str, shard_id: str, owner: str, lease_s: float, max_attempts: int, images: int,
              force: bool = False) -> Claim:  # fmt: skip
        keys = self.keys(run)
        verdict, attempts = self._claim(
            keys=[keys.shards, self.leases, keys.meta],
            args=[shard_id, owner, repr(time.time()), lease_s, max_attempts, images, "1" if force else "0",
                  lease_member(run, shard_id)],
        )  # fmt: skip
        return Claim(_texts([verdict])[0], int(attempts))

    def renew(self, run: str, owner: str, shard_ids: Sequence[str], lease_s: float) -> list[str]:
        """Renew `owner`'s leases; returns the shards it no longer holds."""
        if not shard_ids:
            return []
        pairs = [item for shard_id in shard_ids for item in (shard_id, lease_member(run, shard_id))]
        lost = self._renew(keys=[self.keys(run).shards, self.leases], args=[owner, repr(time.time()), lease_s, *pairs])
        return _texts(lost)

    def finish(self, run: str, shard_id: str, owner: str, labeled: int, failed: int) -> bool:
        """Mark the shard done (only its lease holder can); False: the lease was lost meanwhile."""
        keys = self.keys(run)
        args = [shard_id, owner, repr(time.time()), labeled, failed, lease_member(run, shard_id)]
        return bool(self._finish(keys=[keys.shards, self.leases, keys.meta], args=args))

    def release(self, run: str, shard_id: str, owner: str, uncount: bool) -> bool:
        """Give a held shard back to the queue (the caller requeues its message)."""
        args = [shard_id, owner, "1" if uncount else "0", lease_member(run, shard_id)]
        return bool(self._release(keys=[self.keys(run).shards, self.leases], args=args))

    def lapsed(self, limit: int = 100) -> list[tuple[str, str]]:
        """(run, shard) of every shard, of any run, whose lease ran out (its worker was lost or cut off)."""
        members = self.client.zrangebyscore(self.leases, "-inf", repr(time.time()), start=0, num=limit)
        return [parse_lease_member(m.decode()) for m in members]

    def requeue_lapsed(self, run: str, queue: str, messages: Sequence[tuple[str, str]]) -> list[str]:
        """Put these lapsed shards (id, message) of `run` back at the front of the queue."""
        if not messages:
            return []
        args: list[Any] = [repr(time.time())]
        for shard_id, message in messages:
            args += [shard_id, lease_member(run, shard_id), message]
        done = self._requeue(keys=[self.keys(run).shards, self.leases, queue], args=args)
        return _texts(done)

    def split(self, run: str, queue: str, parent: str, halves: Sequence[tuple[str, int, str]]) -> bool:
        """Replace `parent` by its halves (id, images, message), queued at the front."""
        keys = self.keys(run)
        args: list[Any] = [parent]
        for child, images, message in halves:
            args += [child, images, message]
        return bool(self._split(keys=[keys.shards, keys.meta, queue], args=args))

    def dead_letter(self, run: str, shard_id: str, reason: str) -> None:
        """Remember a shard given up on (its images got error rows), for status and the report."""
        entry = {"shard": shard_id, "run": run, "reason": reason, "at": time.time()}
        self.client.rpush(self.keys(run).dead, compact_json(entry))

    def dead_letters(self, run: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.keys(run).dead, 0, -1)]

    def reopen(self, run: str, shard_ids: Sequence[str], codes: Sequence[str]) -> list[str]:
        """Put done shards with failed images back to queued, to relabel their errors (`codes`,
        or every error when empty); returns the shards reopened."""
        if not shard_ids:
            return []
        keys = self.keys(run)
        reopened = self._reopen(keys=[keys.shards, keys.meta], args=[compact_json(list(codes)), *shard_ids])
        return _texts(reopened)
