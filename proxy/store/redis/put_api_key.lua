-- put_api_key.lua: writes an API key record. last_used_at (field u) never moves backwards,
-- neither by touch nor by writing a stale copy.
--
-- KEYS[1] cp:apikey:<key_id>   ARGV: record JSON, last_used_at or ''

local cur, u = redis.call('HGET', KEYS[1], 'u'), ARGV[2]
if cur and cur ~= '' and (u == '' or tonumber(cur) > tonumber(u)) then u = cur end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'u', u)
return 1
