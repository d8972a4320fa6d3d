-- Free a step lease only if its holder still owns it (a run handing its step back).
-- KEYS: 1 lock.   a: token
if redis.call('GET', KEYS[1]) ~= a.token then return 0 end
return redis.call('DEL', KEYS[1])
