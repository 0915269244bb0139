-- find_user_connection.lua: the runtime user's connection overriding a default one, read through
-- the unique ruc/ key in the same step, so a concurrent move of the user cannot split the read.
--
-- KEYS[1] cp:{t:T}:ruc/<default_cid>/<ru>   ARGV[1] key prefix cp:{t:T}:
-- Returns {version, record JSON} of the holder, or false.

local cid = redis.call('GET', KEYS[1])
if not cid then return false end
return redis.call('HMGET', ARGV[1] .. 'c:' .. cid, 'v', 'd')
