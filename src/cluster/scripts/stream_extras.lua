-- Adds optional events (joins and leaves, read receipts, direct messages)
-- to the events stream while it has room: they are never refused to a
-- client, so past the bound they are skipped rather than let the stream
-- grow.
-- KEYS: the stream. ARGV: 1 the stream's bound, then each event's line.
-- Returns how many went in.
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local added = 0
for i = 2, #ARGV do
  if room <= 0 then break end
  redis.call('XADD', KEYS[1], '*', 'event', ARGV[i])
  room = room - 1
  added = added + 1
end
return added
