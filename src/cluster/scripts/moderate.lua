-- Keeps or lifts a ban, then tells every node.
-- KEYS: the bans hash. ARGV: field, `ban`/`unban`/`kick`, the ban as JSON,
-- the payload to publish.
if ARGV[2] == 'ban' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
elseif ARGV[2] == 'unban' then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', 'cc:moderation', ARGV[4])
return 1
