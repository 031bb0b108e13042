-- republish: the reconciler gives a message to queued shards that have none (lost with the last
-- second of Redis writes, a failover, or a failed run enqueued again).
-- KEYS[1] shards   KEYS[2] the run's queue   KEYS[3] queued index
-- ARGV[1] now   ARGV[2..] triples: shard, queued-index member, message
-- Returns the shards republished; index entries of shards no longer queued are removed.
local republished = {}
for i = 2, #ARGV, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == QUEUED then
    redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ARGV[i + 1])
    republished[#republished + 1] = ARGV[i]
  else
    redis.call('ZREM', KEYS[3], ARGV[i + 1])
  end
end
return republished
