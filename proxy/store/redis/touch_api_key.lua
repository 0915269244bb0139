-- touch_api_key.lua: moves an existing key's last_used_at (field u) forward, never backwards.
--
-- KEYS[1] cp:apikey:<key_id>   ARGV[1] last-used time.   Returns 1 if it moved, else 0.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'u')
if cur and cur ~= '' and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'u', ARGV[1])
return 1
