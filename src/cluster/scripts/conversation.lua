-- Keeps the last direct message of a user's conversation with a peer.
-- KEYS: the user's conversations (a hash: field the peer, value
-- `<unread>:<timestamp>:<message as JSON>`). ARGV: peer, timestamp, the
-- message, `1` if it is to the user (one more unread; `0` reads the
-- conversation), at most how many, expiry (ms).
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local unread = 0
if ARGV[4] == '1' then
  if cur then unread = tonumber(string.match(cur, '^(%d+):')) or 0 end
  unread = unread + 1
end
redis.call('HSET', KEYS[1], ARGV[1], unread .. ':' .. ARGV[2] .. ':' .. ARGV[3])
local max = tonumber(ARGV[5])
local n = redis.call('HLEN', KEYS[1])
if n > max then
  local all = redis.call('HGETALL', KEYS[1])
  local by_age = {}
  for i = 1, #all, 2 do
    table.insert(by_age, {all[i], tonumber(string.match(all[i + 1], '^%d+:(%d+):')) or 0})
  end
  table.sort(by_age, function(a, b) return a[2] < b[2] end)
  for i = 1, n - max do
    redis.call('HDEL', KEYS[1], by_age[i][1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
