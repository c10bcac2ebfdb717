#!lua flags=allow-oom
-- Marks this node alive and finds the nodes that went silent. It runs at
-- Redis's memory limit too: a full Redis is not a lost one.
-- KEYS: the live nodes (a sorted set scored by the last heartbeat, Redis
-- time in ms), when any node last beat. ARGV: this node's id, how long a
-- node may be silent (ms).
-- Returns whether this node was new in the set, the silent nodes it
-- removed, and the live ones. When no node at all could beat for that
-- long, Redis itself was away (paused, restarted): every node starts over
-- instead of being taken for gone.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local silent = tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[2]) or now)
redis.call('SET', KEYS[2], now)
if now - last > silent then
  for _, n in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    redis.call('ZADD', KEYS[1], now, n)
  end
end
local new = redis.call('ZADD', KEYS[1], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - silent)
for _, n in ipairs(gone) do
  redis.call('ZREM', KEYS[1], n)
end
return {new, gone, redis.call('ZRANGE', KEYS[1], 0, -1)}
