-- Orders, keeps and publishes a batch of events of one channel.
-- KEYS: meta (a hash of `epoch` and `offset`), log (a stream), nonces (a
-- sorted set of `user\0nonce`, scored by offset), and with the events
-- stream on, that stream.
-- ARGV: 1 the channel's pub/sub channel, 2 an epoch for a channel that has
-- none, 3 history depth, 4 expiry (ms), 5 the publish command (`SPUBLISH`
-- on a Redis Cluster: the channel shares the keys' slot), 6 the events
-- stream's bound (0: no stream), 7 the channel as a JSON string, then for
-- each event its archive and its nonce key (empty: none), and with the
-- stream on its line for the stream: the event's JSON with the offset
-- (and a new message's id) left blank, where the id goes (0: none), where
-- the offset's `0` is (both counted from 0), when it was sequenced, and 1
-- if it goes in even when the stream is full (it was accepted already).
-- Returns the epoch, then for each event its offset and 1 if it was a
-- message sent again (then not kept nor published: the offset is the
-- first one's), or 0 and 2 if it was refused because the stream is full.
-- The new events are published as one payload, `<first offset>:<epoch>:`
-- and `<length>:<archive>` for each.
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
local bound = tonumber(ARGV[6])
local stride = 2
local room = 0
if bound > 0 then
  stride = 7
  room = bound - redis.call('XLEN', KEYS[4])
end
local out = {epoch}
local frames = {}
local first = nil
local last = nil
local nonces = false
for i = 8, #ARGV, stride do
  local archive, nonce = ARGV[i], ARGV[i + 1]
  local known = nil
  if nonce ~= '' then
    known = redis.call('ZSCORE', KEYS[3], nonce)
  end
  if known then
    table.insert(out, tonumber(known))
    table.insert(out, 1)
  elseif bound > 0 and ARGV[i + 2] ~= '' and room <= 0 and ARGV[i + 6] ~= '1' then
    table.insert(out, 0)
    table.insert(out, 2)
  else
    local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', depth, offset .. '-1', 'm', archive)
    if nonce ~= '' then
      redis.call('ZADD', KEYS[3], offset, nonce)
      nonces = true
    end
    if bound > 0 and ARGV[i + 2] ~= '' then
      local json, id_at, off_at = ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
      local event
      if id_at > 0 then
        event = string.sub(json, 1, id_at) .. epoch .. '-' .. offset
          .. string.sub(json, id_at + 1, off_at) .. offset .. string.sub(json, off_at + 2)
      else
        event = string.sub(json, 1, off_at) .. offset .. string.sub(json, off_at + 2)
      end
      redis.call('XADD', KEYS[4], '*', 'event', '{"channel":' .. ARGV[7] .. ',"epoch":"' .. epoch
        .. '","offset":' .. offset .. ',"at":' .. ARGV[i + 5] .. ',"event":' .. event .. '}')
      room = room - 1
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
