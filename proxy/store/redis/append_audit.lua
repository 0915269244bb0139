-- append_audit.lua: appends a batch of one tenant's audit events to its stream.
-- Entry ids are max(event ts, previous id) in ms: arrival order is kept, and id >= ts always, so
-- ``since`` maps exactly onto an id lower bound (and pruning by id never drops a newer event).
--
-- KEYS[1] cp:{t:T}:audit   KEYS[2] cp:{t:T}:auditseq
-- ARGV: maxlen, then per event: ts in ms, event JSON.   Returns the number appended.

local key, maxlen = KEYS[1], ARGV[1]
local n = (#ARGV - 1) / 2
local first = redis.call('INCRBY', KEYS[2], n) - n
local last = 0
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last = tonumber(string.match(info[j + 1], '^(%d+)')) end
  end
end
for i = 1, n do
  local ms = tonumber(ARGV[2 * i])
  if ms < last then ms = last end
  last = ms
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, string.format('%d-*', ms),
    's', string.format('%d', first + i), 'e', ARGV[2 * i + 1])
end
return n
