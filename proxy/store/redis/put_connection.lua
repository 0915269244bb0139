-- put_connection.lua: a connection record's compare-and-set write, with every index it appears in
-- and the invalidation, in one step (RedisStore.put_connection).
--
-- KEYS[1] record hash cp:{t:T}:c:<cid>   KEYS[2] id index cp:{t:T}:cidx
-- ARGV: mode ('new'|'ver'|'any'), expected version, record JSON, cid, runtime user, default
--       connection, integration, key prefix cp:{t:T}:, channel, message, key check JSON or ''
-- Returns {'ok', new version} | {'conflict', current version or -1} | {'taken', holder id}
--         | {'nokeys', 0}
-- Index keys are derived from the prefix of KEYS[1], so every key is in KEYS[1]'s slot.

local rec, cidx = KEYS[1], KEYS[2]
local mode, expected, json, cid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ru, dc, integ, prefix = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
-- The ciphertexts are written only while the tenant key record still holds the wrapped data keys
-- they were sealed under (same slot: the tenant record shares the prefix's hash tag).
if ARGV[11] ~= '' then
  local t = redis.call('HGET', prefix .. 'tenant', 'd')
  if not t then return {'nokeys', 0} end
  local wrapped = cjson.decode(t)['wrapped_deks']
  if type(wrapped) ~= 'table' then return {'nokeys', 0} end
  for v, blob in pairs(cjson.decode(ARGV[11])) do
    local w = wrapped[v]
    if type(w) ~= 'table' or w['blob'] ~= blob then return {'nokeys', 0} end
  end
end
local cur = redis.call('HMGET', rec, 'v', 'ru', 'dc', 'in')
local curv = cur[1] and tonumber(cur[1])
if (mode == 'new' and curv) or (mode == 'ver' and curv ~= tonumber(expected)) then
  return {'conflict', curv or -1}
end
if ru ~= '' and dc ~= '' then
  local holder = redis.call('GET', prefix .. 'ruc/' .. dc .. '/' .. ru)
  if holder and holder ~= cid then return {'taken', holder} end
end
if curv then
  local oru, odc, oin = cur[2] or '', cur[3] or '', cur[4] or ''
  if oru ~= '' and oru ~= ru then redis.call('ZREM', prefix .. 'ru/' .. oru, cid) end
  if odc ~= '' and odc ~= dc then redis.call('ZREM', prefix .. 'dc/' .. odc, cid) end
  if oin ~= '' and oin ~= integ then redis.call('ZREM', prefix .. 'in/' .. oin, cid) end
  if oru ~= '' and odc ~= '' and (oru ~= ru or odc ~= dc) then
    local k = prefix .. 'ruc/' .. odc .. '/' .. oru
    if redis.call('GET', k) == cid then redis.call('DEL', k) end
  end
end
local newv = (curv or 0) + 1
redis.call('HSET', rec, 'v', newv, 'd', json, 'ru', ru, 'dc', dc, 'in', integ)
redis.call('ZADD', cidx, 0, cid)
if ru ~= '' then redis.call('ZADD', prefix .. 'ru/' .. ru, 0, cid) end
if dc ~= '' then redis.call('ZADD', prefix .. 'dc/' .. dc, 0, cid) end
if integ ~= '' then redis.call('ZADD', prefix .. 'in/' .. integ, 0, cid) end
if ru ~= '' and dc ~= '' then redis.call('SET', prefix .. 'ruc/' .. dc .. '/' .. ru, cid) end
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {'ok', newv}
