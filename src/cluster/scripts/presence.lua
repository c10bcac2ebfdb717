-- A node's part of a user's presence: kept (or, offline, removed) and
-- told to the nodes that follow the user. KEYS: the user's presence hash.
-- ARGV: node, archive, `1` when offline, the publish command, the user's
-- pub/sub channel, the payload.
if ARGV[3] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call(ARGV[4], ARGV[5], ARGV[6])
return 1
