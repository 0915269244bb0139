-- put_tenant.lua: a tenant record's compare-and-set write and its invalidation, in one step.
--
-- KEYS[1] cp:{t:T}:tenant   ARGV: mode ('new'|'ver'|'any'), expected version, record JSON,
-- channel, message.   Returns {'ok', new version} | {'conflict', current version or -1}

local curv = redis.call('HGET', KEYS[1], 'v')
curv = curv and tonumber(curv)
local mode, expected = ARGV[1], ARGV[2]
if (mode == 'new' and curv) or (mode == 'ver' and curv ~= tonumber(expected)) then
  return {'conflict', curv or -1}
end
local newv = (curv or 0) + 1
redis.call('HSET', KEYS[1], 'v', newv, 'd', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', newv}
