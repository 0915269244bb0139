-- delete_connection.lua: removes a connection record with its index entries and publishes the
-- invalidation, in one step (RedisStore.delete_connection).
--
-- KEYS[1] record hash   KEYS[2] id index
-- ARGV: cid, key prefix cp:{t:T}:, channel, message.   Returns 1 if it existed, else 0.

local rec, cidx = KEYS[1], KEYS[2]
local cid, prefix = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', rec, 'v', 'ru', 'dc', 'in')
if not cur[1] then return 0 end
local oru, odc, oin = cur[2] or '', cur[3] or '', cur[4] or ''
if oru ~= '' then redis.call('ZREM', prefix .. 'ru/' .. oru, cid) end
if odc ~= '' then redis.call('ZREM', prefix .. 'dc/' .. odc, cid) end
if oin ~= '' then redis.call('ZREM', prefix .. 'in/' .. oin, cid) end
if oru ~= '' and odc ~= '' then
  local k = prefix .. 'ruc/' .. odc .. '/' .. oru
  if redis.call('GET', k) == cid then redis.call('DEL', k) end
end
redis.call('DEL', rec)
redis.call('ZREM', cidx, cid)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
