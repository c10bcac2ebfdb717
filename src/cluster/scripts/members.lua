-- A node's connections in a channel: kept, and told to the nodes that
-- follow it. KEYS: the channel's members hash. ARGV: node, count (0
-- removes the field), expiry (ms), the publish command, the channel's
-- pub/sub channel, the payload.
if ARGV[2] == '0' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
redis.call(ARGV[4], ARGV[5], ARGV[6])
return 1
