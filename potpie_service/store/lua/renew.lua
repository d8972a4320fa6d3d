-- Extend a step lease only while its holder still owns it.
-- KEYS: 1 lock.   a: token, ttl_ms
if redis.call('GET', KEYS[1]) ~= a.token then return 0 end
return redis.call('PEXPIRE', KEYS[1], a.ttl_ms)
