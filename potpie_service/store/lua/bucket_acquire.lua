-- Take one token from the shared Potpie bucket; returns the seconds to wait, as a string (0: go).
-- KEYS: 1 bucket.   a: rate (tokens/s), burst, now
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'paused_until')
local paused = tonumber(bucket[3]) or 0
if a.now < paused then return tostring(paused - a.now) end
local tokens = tonumber(bucket[1]) or a.burst
local last = tonumber(bucket[2]) or a.now
tokens = math.min(a.burst, tokens + math.max(0, a.now - last) * a.rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / a.rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(a.now))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
