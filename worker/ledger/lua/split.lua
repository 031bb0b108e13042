-- split: a shard that used its attempts is replaced by its halves, queued at the front.
-- KEYS[1] shards   KEYS[2] meta   KEYS[3] the run's queue   KEYS[4] queued index
-- ARGV[1] parent   ARGV[2] run   ARGV[3] now   ARGV[4..] triples: child, images, message
-- Not split: a shard done or split already, nor one running under a lease that has not lapsed (a
-- living worker took it meanwhile, e.g. one allowed more attempts: it writes the shard's file).
-- Returns 1 if it was split now.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local parent = cjson.decode(raw)
if parent['s'] == DONE or parent['s'] == SPLIT then return 0 end
if parent['s'] == RUNNING and tonumber(parent['u']) > tonumber(ARGV[3]) then return 0 end
parent['s'] = SPLIT
parent['o'] = nil
parent['u'] = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(parent))
redis.call('ZREM', KEYS[4], ARGV[2] .. '|' .. ARGV[1])
local added, counted = 0, 0
for i = 4, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], cjson.encode({s = QUEUED, n = tonumber(ARGV[i + 1]), a = 0})) == 1 then
    added = added + 1
    counted = counted + tonumber(ARGV[i + 1])
  end
  redis.call('ZADD', KEYS[4], tonumber(ARGV[3]), ARGV[2] .. '|' .. ARGV[i])
  redis.call('RPUSH', KEYS[3], ARGV[i + 2])
end
redis.call('HINCRBY', KEYS[2], 'shards', added - 1)
-- a container registered uncounted (0 images) was counted to be split: its halves bring its images
if tonumber(parent['n']) == 0 then redis.call('HINCRBY', KEYS[2], 'images', counted) end
return 1
