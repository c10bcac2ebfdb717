-- A node's connections in a channel: kept, and told to the nodes that
-- follow it. KEYS: the channel's members hash (no expiry: a field goes
-- when its node has no connection there, or stops, or is taken for gone).
-- ARGV: node, count (0 removes the field), the publish command, the
-- channel's pub/sub channel, the payload.
if ARGV[2] == '0' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call(ARGV[3], ARGV[4], ARGV[5])
return 1
