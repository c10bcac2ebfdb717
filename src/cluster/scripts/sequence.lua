-- Orders, keeps and publishes a batch of events of one channel.
-- KEYS: meta (a hash of `epoch` and `offset`), log (a stream), nonces (a
-- sorted set of `user\0nonce`, scored by offset).
-- ARGV: 1 the channel's pub/sub channel, 2 an epoch for a channel that has
-- none, 3 history depth, 4 expiry (ms), 5 the publish command (`SPUBLISH`
-- on a Redis Cluster: the channel shares the keys' slot), then for each
-- event its archive and its nonce key (empty: none).
-- Returns the epoch, then for each event its offset and 1 if it was a
-- message sent again (then not kept nor published: the offset is the
-- first one's). The new events are published as one payload,
-- `<first offset>:<epoch>:` and `<length>:<archive>` for each.
--
-- The channel's epoch remembers the replication id of the Redis that keeps
-- it: a replica promoted after its master died (or a Redis restarted from
-- a snapshot) may lack what the other published last, so there the
-- channel starts over under a new epoch, as on a Redis restarted empty
-- (an offset is never given twice in one epoch).
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or redis.call('HGET', KEYS[1], 'rid') ~= rid then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'rid', rid)
end
local depth = tonumber(ARGV[3])
local out = {epoch}
local frames = {}
local first = nil
local last = nil
local nonces = false
for i = 6, #ARGV, 2 do
  local archive, nonce = ARGV[i], ARGV[i + 1]
  local known = nil
  if nonce ~= '' then
    known = redis.call('ZSCORE', KEYS[3], nonce)
  end
  if known then
    table.insert(out, tonumber(known))
    table.insert(out, 1)
  else
    local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', depth, offset .. '-1', 'm', archive)
    if nonce ~= '' then
      redis.call('ZADD', KEYS[3], offset, nonce)
      nonces = true
    end
    if not first then first = offset end
    last = offset
    table.insert(frames, #archive .. ':' .. archive)
    table.insert(out, offset)
    table.insert(out, 0)
  end
end
if first then
  if nonces then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', last - depth)
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call(ARGV[5], ARGV[1], first .. ':' .. epoch .. ':' .. table.concat(frames))
end
return out
