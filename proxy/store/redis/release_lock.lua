-- release_lock.lua: deletes the lock only while ARGV[1] is still its owner token.
--
-- KEYS[1] cp:lock:<name>.   Returns 1 if released, else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
