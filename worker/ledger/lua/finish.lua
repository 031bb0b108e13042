-- finish: the lease holder marks its shard done, after its Parquet file is durable; the run's
-- counts move once.
-- KEYS[1] shards   KEYS[2] leases   KEYS[3] meta   KEYS[4] queued index
-- ARGV[1] shard   ARGV[2] owner   ARGV[3] now   ARGV[4] labeled   ARGV[5] failed   ARGV[6] lease member
-- Returns 1 if this call marked it done, 0 if the caller no longer held it.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local state = cjson.decode(raw)
if state['s'] ~= RUNNING or state['o'] ~= ARGV[2] then return 0 end
state['s'] = DONE
state['l'] = tonumber(ARGV[4])
state['f'] = tonumber(ARGV[5])
-- A shard's rows are its images: a container is counted only when it is read (registered with 0),
-- and read again by a retry it may hold more samples than before (a partial copy completed).
local rows = state['l'] + state['f']
if rows ~= tonumber(state['n']) then
  redis.call('HINCRBY', KEYS[3], 'images', rows - tonumber(state['n']))
  state['n'] = rows
end
state['o'] = nil
state['u'] = nil
state['r'] = nil
state['h'] = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('HINCRBY', KEYS[3], 'done', state['n'])
redis.call('HINCRBY', KEYS[3], 'failed', state['f'])
redis.call('HINCRBY', KEYS[3], 'shards_done', 1)
redis.call('HSET', KEYS[3], 'last_record_at', ARGV[3])
return 1
