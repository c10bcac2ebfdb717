-- Trims the events stream up to what every consumer group has read.
-- KEYS: the stream.
-- For each group the first entry it still needs is its oldest pending one
-- (read but not acknowledged), or else the one after the last it read; the
-- stream keeps everything from the earliest of those. Without a group
-- nothing is trimmed: no one has read anything yet.
-- Returns the stream's length after the trim, and how many entries went.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local function lt(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end
local keep = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need
  if tonumber(info['pending']) > 0 then
    need = redis.call('XPENDING', KEYS[1], info['name'])[2]
  else
    local ms, seq = string.match(info['last-delivered-id'], '(%d+)-(%d+)')
    need = ms .. '-' .. (tonumber(seq) + 1)
  end
  if not keep or lt(need, keep) then keep = need end
end
local trimmed = 0
if keep then
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', keep)
end
return {redis.call('XLEN', KEYS[1]), trimmed}
