-- Keeps a change of a user's notifications and tells the nodes that
-- follow the user. KEYS: the user's notifications (a hash: field
-- `<created_at as 16 hex digits>.<id>`, value the notification as JSON).
-- ARGV: `add`/`set`/`del`/`clear`, the publish command, the user's
-- pub/sub channel, the payload, at most how many, expiry (ms), then
-- field and value pairs (`add`, `set`: `set` only rewrites fields still
-- there) or fields (`del`).
local op = ARGV[1]
if op == 'clear' then
  redis.call('DEL', KEYS[1])
else
  local step = 2
  if op == 'del' then step = 1 end
  for i = 7, #ARGV, step do
    if op == 'del' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    elseif op == 'add' or redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  end
  if op == 'add' then
    local max = tonumber(ARGV[5])
    local n = redis.call('HLEN', KEYS[1])
    if n > max then
      local fields = redis.call('HKEYS', KEYS[1])
      table.sort(fields)
      for i = 1, n - max do
        redis.call('HDEL', KEYS[1], fields[i])
      end
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[6])
  end
end
redis.call(ARGV[2], ARGV[3], ARGV[4])
return 1
