-- register: an enqueue adds the shards of its run that the ledger does not know yet.
-- KEYS[1] shards hash of the run   KEYS[2] meta hash of the run   KEYS[3] queued index (zset)
-- ARGV[1] now   ARGV[2] run
-- ARGV[3..] quads: shard id, images (0: a container not counted yet), rows of its file on storage
--   (-1: no file), failed rows of that file
-- A new shard whose file on storage already holds one row per image is registered done (storage
-- is the record of what is done: a wiped ledger does not relabel it); any other new shard is queued.
-- Returns, per shard, its state after the call: queued or lapsed ones need a message.
local now = tonumber(ARGV[1])
local states = {}
local added, images, done, done_images, failed = 0, 0, 0, 0, 0
for i = 3, #ARGV, 4 do
  local shard, n = ARGV[i], tonumber(ARGV[i + 1])
  local rows, bad = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local member = ARGV[2] .. '|' .. shard
  local old = redis.call('HGET', KEYS[1], shard)
  if old then
    local state = cjson.decode(old)
    if state['s'] == RUNNING and tonumber(state['u']) <= now then
      states[#states + 1] = LAPSED
    else
      if state['s'] == QUEUED then redis.call('ZADD', KEYS[3], now, member) end
      states[#states + 1] = state['s']
    end
  else
    added = added + 1
    if n == 0 and rows > 0 then n = rows end  -- a container's file holds one row per sample it has
    images = images + n
    if rows == n then
      redis.call('HSET', KEYS[1], shard, cjson.encode({s = DONE, n = n, l = n - bad, f = bad, a = 0}))
      done, done_images, failed = done + 1, done_images + n, failed + bad
      states[#states + 1] = DONE
    else
      redis.call('HSET', KEYS[1], shard, cjson.encode({s = QUEUED, n = n, a = 0}))
      redis.call('ZADD', KEYS[3], now, member)
      states[#states + 1] = QUEUED
    end
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'shards', added)
  redis.call('HINCRBY', KEYS[2], 'images', images)
end
if done > 0 then
  redis.call('HINCRBY', KEYS[2], 'shards_done', done)
  redis.call('HINCRBY', KEYS[2], 'done', done_images)
  redis.call('HINCRBY', KEYS[2], 'failed', failed)
  redis.call('HSET', KEYS[2], 'last_record_at', ARGV[1])
end
return states
