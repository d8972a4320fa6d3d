-- A step's outcome, written only while its lease is the caller's; its event published with the seq it takes,
-- unless it is a progress-only change inside the throttle window.
-- KEYS: 1 job, 2 lock.   a: token, now, progress_only, throttle_s, keep_ms (0: free the lease), fields, news
if redis.call('GET', KEYS[2]) ~= a.token then return -1 end
redis.call('HSET', KEYS[1], unpack(flat(a.fields)))
if a.keep_ms == 0 then redis.call('DEL', KEYS[2]) else redis.call('PEXPIRE', KEYS[2], a.keep_ms) end
if a.progress_only then
  local last = tonumber(redis.call('HGET', KEYS[1], 'emitted_at') or '0')
  if a.now - last < a.throttle_s then return 0 end
end
redis.call('HSET', KEYS[1], 'emitted_at', a.now)
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
broadcast(a.news, seq)
return seq
