-- Hold every worker's Potpie requests until `until` (Potpie answered 429 with Retry-After).
-- KEYS: 1 bucket.   a: until (unix time)
local current = tonumber(redis.call('HGET', KEYS[1], 'paused_until')) or 0
if a['until'] > current then redis.call('HSET', KEYS[1], 'paused_until', tostring(a['until'])) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
