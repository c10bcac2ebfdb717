-- A channel's state: its offset, epoch, last events (newest first) and
-- each node's connections in it.
-- KEYS: meta, log, members, nonces. ARGV: how many events, an epoch for a channel
-- that has none, expiry (ms).
-- A new epoch too where another Redis kept the channel before (see
-- sequence.lua).
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or redis.call('HGET', KEYS[1], 'rid') ~= rid then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'rid', rid)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
return {offset, epoch, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1]),
  redis.call('HGETALL', KEYS[3])}
