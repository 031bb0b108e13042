-- release: the lease holder gives its shard back (its message is requeued by Celery, or, for a
-- failed run, by the enqueue that clears the failure).
-- KEYS[1] shards   KEYS[2] leases   KEYS[3] queued index
-- ARGV[1] shard   ARGV[2] owner   ARGV[3] uncount ('1': the worker failed, not the shard)
-- ARGV[4] lease member   ARGV[5] now
-- Returns 1 if released, 0 if the caller no longer held it.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local state = cjson.decode(raw)
if state['s'] ~= RUNNING or state['o'] ~= ARGV[2] then return 0 end
state['s'] = QUEUED
state['o'] = nil
state['u'] = nil
state['h'] = nil
if ARGV[3] == '1' and state['a'] > 0 then state['a'] = state['a'] - 1 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[5]), ARGV[4])
return 1
