-- claim: a worker takes a shard under a lease.
-- KEYS[1] shards   KEYS[2] leases (zset, all runs)   KEYS[3] meta   KEYS[4] queued index (zset)
-- ARGV[1] shard   ARGV[2] owner token   ARGV[3] now   ARGV[4] lease seconds   ARGV[5] max attempts
-- ARGV[6] images (a shard a service submitted itself is registered here)   ARGV[7] force ('1': take
-- it whatever its attempts, to write its one image's error row)   ARGV[8] lease member (run|shard)
-- ARGV[9] max losses (lapses of any kind before it counts as exhausted)
-- ARGV[10] shards the worker holds with this one (a lapse of a worker holding several is not
-- evidence against any one of them: requeue_lapsed spends no attempt on it)
-- ARGV[11] '1': register the shard if the ledger does not know it (a service's own shard, whose
-- message carries its paths); otherwise an unknown shard answers `unknown` (a half whose split
-- Redis forgot, a run deleted or lost meanwhile): registering it would count its images twice.
-- Returns {verdict, attempts}: run, done, split, busy (another living worker holds it), exhausted,
-- run_failed (the run is failed: the shard stays queued until the run is enqueued again), unknown.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local now = tonumber(ARGV[3])
local state
if raw then
  state = cjson.decode(raw)
elseif ARGV[11] ~= '1' then
  return {V_UNKNOWN, 0}
else
  state = {s = QUEUED, n = tonumber(ARGV[6]), a = 0}
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
  redis.call('ZADD', KEYS[4], now, ARGV[8])
  redis.call('HINCRBY', KEYS[3], 'shards', 1)
  redis.call('HINCRBY', KEYS[3], 'images', tonumber(ARGV[6]))
end
if state['s'] == DONE or state['s'] == SPLIT then return {state['s'], state['a']} end
if state['s'] == RUNNING and state['o'] ~= ARGV[2] and tonumber(state['u']) > now then
  return {V_BUSY, state['a']}
end
if redis.call('HEXISTS', KEYS[3], 'failed_reason') == 1 then return {V_RUN_FAILED, state['a']} end
if ARGV[7] ~= '1' then
  if state['a'] >= tonumber(ARGV[5]) or (state['k'] or 0) >= tonumber(ARGV[9]) then
    return {V_EXHAUSTED, state['a']}
  end
  state['a'] = state['a'] + 1
end
state['s'] = RUNNING
state['o'] = ARGV[2]
state['u'] = now + tonumber(ARGV[4])
state['h'] = tonumber(ARGV[10])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZADD', KEYS[2], state['u'], ARGV[8])
redis.call('ZREM', KEYS[4], ARGV[8])
redis.call('HSETNX', KEYS[3], 'first_record_at', ARGV[3])
return {V_RUN, state['a']}
