-- A channel's state: its offset, epoch, last events (newest first) and
-- each node's connections in it.
-- KEYS: meta, log, members. ARGV: how many events, an epoch for a channel
-- that has none, expiry (ms).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
return {offset, epoch, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1]),
  redis.call('HGETALL', KEYS[3])}
