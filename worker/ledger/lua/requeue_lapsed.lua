-- requeue_lapsed: a sweeper puts shards whose lease ran out (their worker was lost or cut off)
-- back at the front of the queue, state and message in one step.
-- KEYS[1] shards   KEYS[2] leases   KEYS[3] the run's queue (list)   KEYS[4] queued index
-- ARGV[1] now   ARGV[2..] triples: shard, lease member, message
-- A shard whose worker held others with it when it was last heard of ('h' > 1) was lost with its
-- worker (preempted, killed): not evidence against this shard, so no attempt is spent; every
-- loss still counts toward the claim's max losses.
-- Returns the shards requeued. Lease entries of shards no longer running are removed.
local requeued = {}
local now = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == RUNNING and tonumber(state['u']) <= now then
    state['s'] = QUEUED
    state['o'] = nil
    state['u'] = nil
    state['k'] = (state['k'] or 0) + 1
    if (state['h'] or 1) > 1 and state['a'] > 0 then state['a'] = state['a'] - 1 end
    state['h'] = nil
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    redis.call('RPUSH', KEYS[3], ARGV[i + 2])
    redis.call('ZADD', KEYS[4], now, ARGV[i + 1])
    requeued[#requeued + 1] = ARGV[i]
  end
  if not state or state['s'] ~= RUNNING or tonumber(state['u']) <= now then
    redis.call('ZREM', KEYS[2], ARGV[i + 1])
  end
end
return requeued
