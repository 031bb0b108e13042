"""Every read and write of a run's records, counts and deliveries in Redis (keys: runs/keys.py).

Record writes are idempotent and counted in Lua, atomically: `done`/`failed` change only when a path
goes from no record to a record, so counters stay exact however often a job is redelivered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.records import compact_json, error_code, is_error
from worker.runs.keys import RunKeys, runs_key

QUEUED = ""  # the placeholder value of a path that is queued and has no record yet

# KEYS: records, meta. ARGV: now, then (path, record JSON, "1" if error else "0") triples.
_WRITE_RECORDS = """
local done, failed = 0, 0
for i = 2, #ARGV, 3 do
  local path, rec, is_err = ARGV[i], ARGV[i + 1], ARGV[i + 2] == '1'
  local old = redis.call('HGET', KEYS[1], path)
  redis.call('HSET', KEYS[1], path, rec)
  if (not old) or old == '' then
    done = done + 1
    if is_err then failed = failed + 1 end
  else
    local old_err = cjson.decode(old)['error'] ~= nil
    if old_err and not is_err then failed = failed - 1 end
    if is_err and not old_err then failed = failed + 1 end
  end
end
if done > 0 then
  redis.call('HINCRBY', KEYS[2], 'done', done)
  redis.call('HSETNX', KEYS[2], 'first_record_at', ARGV[1])
end
if failed ~= 0 then redis.call('HINCRBY', KEYS[2], 'failed', failed) end
redis.call('HSET', KEYS[2], 'last_record_at', ARGV[1])
return done
"""

# KEYS: records. ARGV[1]: JSON array of paths (one argument: packing thousands of arguments costs
# the client more than the whole script costs Redis; one HMGET and one HSET per 1,000 paths cost
# Redis far less than a call per path). Marks paths without a record as queued and returns one
# flag per path: "1" = publish it (no record yet), "0" = it has a record (resume skips it).
_CLAIM_PATHS = """
local paths = cjson.decode(ARGV[1])
local flags = {}
for first = 1, #paths, 1000 do
  local last = math.min(first + 999, #paths)
  local values = redis.call('HMGET', KEYS[1], unpack(paths, first, last))
  local fresh = {}
  for i = first, last do
    local value = values[i - first + 1]
    if not value then
      fresh[#fresh + 1] = paths[i]
      fresh[#fresh + 1] = ''
      flags[i] = '1'
    elseif value == '' then
      flags[i] = '1'
    else
      flags[i] = '0'
    end
  end
  if #fresh > 0 then redis.call('HSET', KEYS[1], unpack(fresh)) end
end
return table.concat(flags)
"""


# KEYS: records, meta. ARGV: (path, record JSON as read) pairs. Puts each path whose record is still
# the one read back to the queued placeholder and takes it out of the done and failed counts, so a
# retry publishes it again and its new record counts once; a record rewritten meanwhile is left.
_REOPEN_RECORDS = """
local reopened = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], '')
    reopened[#reopened + 1] = ARGV[i]
  end
end
if #reopened > 0 then
  redis.call('HINCRBY', KEYS[2], 'done', -#reopened)
  redis.call('HINCRBY', KEYS[2], 'failed', -#reopened)
end
return reopened
"""


@dataclass(frozen=True)
class RunStatus:
    run: str
    total: int
    done: int
    failed: int
    dead_jobs: int
    queued_jobs: int
    created_at: float | None
    first_record_at: float | None
    last_record_at: float | None
    enqueuing_until: float | None = None

    def enqueuing(self, now: float | None = None) -> bool:
        """An enqueue of this run is still adding paths (its lease has not run out)."""
        return self.enqueuing_until is not None and self.enqueuing_until > (now or time.time())

    def finished(self, now: float | None = None) -> bool:
        """Every path has a record and no enqueue is adding more (an empty run is finished too)."""
        return self.pending == 0 and not self.enqueuing(now)

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done)

    @property
    def labeled(self) -> int:
        return self.done - self.failed

    def average_rate(self) -> float:
        """Records per second from the first record to the last one."""
        if not self.first_record_at or not self.last_record_at or self.done < 2:
            return 0.0
        span = self.last_record_at - self.first_record_at
        return self.done / span if span > 0 else 0.0


class RunStore:
    """Reads and writes of runs in Redis. Thread-safe: redis-py clients share a connection pool."""

    def __init__(self, client: redis.Redis, prefix: str = "labeler") -> None:
        self.client = client
        self.prefix = prefix
        self._write = client.register_script(_WRITE_RECORDS)
        self._claim = client.register_script(_CLAIM_PATHS)
        self._reopen = client.register_script(_REOPEN_RECORDS)

    def keys(self, run: str) -> RunKeys:
        return RunKeys(self.prefix, run)

    # -- client side -------------------------------------------------------------------------

    def register_run(self, run: str, now: float | None = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(runs_key(self.prefix), run)
        pipe.hsetnx(self.keys(run).meta, "created_at", repr(now or time.time()))
        pipe.execute()

    def renew_enqueue_lease(self, run: str, lease_s: float, now: float | None = None) -> None:
        """Say an enqueue is adding paths for `lease_s` more seconds, so `status --watch` and
        `enqueue --wait` do not take a run whose workers caught up between batches for finished."""
        self.client.hset(self.keys(run).meta, "enqueuing_until", repr((now or time.time()) + lease_s))

    def end_enqueue_lease(self, run: str) -> None:
        self.client.hdel(self.keys(run).meta, "enqueuing_until")

    def claim_paths(self, pipe: redis.client.Pipeline, run: str, paths: Sequence[str]) -> None:
        """Queue, on `pipe`, the claim of `paths`; its reply is the flag string of _CLAIM_PATHS."""
        encoded = compact_json(list(paths))
        self._claim(keys=[self.keys(run).records], args=[encoded], client=pipe)

    def count_jobs(self, run: str, jobs: int) -> None:
        self.client.hincrby(self.keys(run).meta, "jobs", jobs)

    def status(self, run: str, queue: str) -> RunStatus:
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(self.keys(run).records)
        pipe.hgetall(self.keys(run).meta)
        pipe.llen(self.keys(run).dead)
        pipe.llen(queue)
        total, meta, dead, queued = pipe.execute()
        meta = {k.decode(): v.decode() for k, v in meta.items()}

        def number(name: str) -> float | None:
            return float(meta[name]) if name in meta else None

        return RunStatus(
            run=run,
            total=int(total),
            done=int(meta.get("done", 0)),
            failed=int(meta.get("failed", 0)),
            dead_jobs=int(dead),
            queued_jobs=int(queued),
            created_at=number("created_at"),
            first_record_at=number("first_record_at"),
            last_record_at=number("last_record_at"),
            enqueuing_until=number("enqueuing_until"),
        )

    def exists(self, run: str) -> bool:
        return bool(self.client.exists(self.keys(run).meta, self.keys(run).records))

    def iter_records(self, run: str, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every finished record, streamed with HSCAN (constant memory; order is Redis's)."""
        for _path, value in self.client.hscan_iter(self.keys(run).records, count=batch):
            if value:
                yield json.loads(value)

    def iter_failed(
        self, run: str, codes: frozenset[str] = frozenset(), batch: int = 1000
    ) -> Iterator[list[str]]:
        """Batches of paths whose record is an error (with one of `codes`, or any), reopened: each
        is back to the queued placeholder and out of the counts, ready to be published again."""
        found: list[tuple[str, bytes]] = []
        for path, value in self.client.hscan_iter(self.keys(run).records, count=batch):
            if not value:
                continue
            code = error_code(json.loads(value))
            if code is not None and (not codes or code in codes):
                found.append((path.decode(), value))
            if len(found) >= batch:
                yield self._reopen_records(run, found)
                found = []
        if found:
            yield self._reopen_records(run, found)

    def _reopen_records(self, run: str, found: Sequence[tuple[str, bytes]]) -> list[str]:
        args = [item for pair in found for item in pair]
        reopened = self._reopen(keys=[self.keys(run).records, self.keys(run).meta], args=args)
        return [path.decode() if isinstance(path, bytes) else path for path in reopened]

    def dead_letters(self, run: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.client.lrange(self.keys(run).dead, 0, -1)]

    # -- worker side -------------------------------------------------------------------------

    def paths_without_record(self, run: str, paths: Sequence[str]) -> list[str]:
        """The paths of a job that still need work (a redelivered job skips finished ones)."""
        if not paths:
            return []
        values = self.client.hmget(self.keys(run).records, list(paths))
        return [path for path, value in zip(paths, values, strict=True) if not value]

    def get_records(self, run: str, paths: Sequence[str]) -> list[dict[str, Any] | None]:
        values = self.client.hmget(self.keys(run).records, list(paths)) if paths else []
        return [json.loads(v) if v else None for v in values]

    def write_records(self, run: str, records: Sequence[dict[str, Any]]) -> int:
        """Write records idempotently; returns how many paths got their first record."""
        if not records:
            return 0
        args: list[str] = [repr(time.time())]
        for record in records:
            args += [
                record["path"],
                compact_json(record),
                "1" if is_error(record) else "0",
            ]
        return int(self._write(keys=[self.keys(run).records, self.keys(run).meta], args=args))

    def count_delivery(self, run: str, job_id: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(runs_key(self.prefix), run)
        pipe.hsetnx(self.keys(run).meta, "created_at", repr(time.time()))
        pipe.hincrby(self.keys(run).deliveries, job_id, 1)
        return int(pipe.execute()[-1])

    def uncount_delivery(self, run: str, job_id: str) -> None:
        """A clean handback (warm shutdown) is not a failed delivery."""
        self.client.hincrby(self.keys(run).deliveries, job_id, -1)

    def note_error(self, run: str, job_id: str, error: str) -> None:
        self.client.hset(self.keys(run).deliveries, f"{job_id}:error", error[:2000])

    def last_error(self, run: str, job_id: str) -> str | None:
        value = self.client.hget(self.keys(run).deliveries, f"{job_id}:error")
        return value.decode() if value else None

    def finish_job(self, run: str, job_id: str) -> None:
        self.client.hdel(self.keys(run).deliveries, job_id, f"{job_id}:error")

    def dead_letter(self, run: str, job_id: str, paths: Sequence[str], deliveries: int, reason: str) -> None:
        entry = {
            "job_id": job_id,
            "run": run,
            "paths": list(paths),
            "deliveries": deliveries,
            "reason": reason,
            "at": time.time(),
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.keys(run).dead, compact_json(entry))
        pipe.hdel(self.keys(run).deliveries, job_id, f"{job_id}:error")
        pipe.execute()
