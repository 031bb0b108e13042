-- reopen: done shards with failed images go back to queued, out of the done counts, remembering
-- which error codes to relabel (`labeler retry`; the caller publishes their messages).
-- KEYS[1] shards   KEYS[2] meta   KEYS[3] queued index
-- ARGV[1] codes (JSON list; empty: every error)   ARGV[2] run   ARGV[3] now   ARGV[4..] shard ids
-- Returns the shards reopened.
local reopened = {}
for i = 4, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local state = raw and cjson.decode(raw)
  if state and state['s'] == DONE and (state['f'] or 0) > 0 then
    redis.call('HINCRBY', KEYS[2], 'done', -state['n'])
    redis.call('HINCRBY', KEYS[2], 'failed', -state['f'])
    redis.call('HINCRBY', KEYS[2], 'shards_done', -1)
    state['s'] = QUEUED
    state['a'] = 0
    state['k'] = 0
    state['r'] = ARGV[1]
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(state))
    redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[2] .. '|' .. ARGV[i])
    reopened[#reopened + 1] = ARGV[i]
  end
end
return reopened
