-- renew: a worker's heartbeat extends the leases it still holds.
-- KEYS[1] shards   KEYS[2] leases
-- ARGV[1] owner   ARGV[2] now   ARGV[3] lease seconds   ARGV[4] shards the owner's worker holds now
-- ARGV[5..] pairs: shard, lease member
-- Returns the shards the owner no longer holds (done by another after a lapse, or taken over).
local lost = {}
local expires = tonumber(ARGV[2]) + tonumber(ARGV[3])
for i = 5, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == RUNNING and state['o'] == ARGV[1] then
    state['u'] = expires
    state['h'] = tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    redis.call('ZADD', KEYS[2], expires, ARGV[i + 1])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
