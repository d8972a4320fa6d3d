-- The end of a job (finished, failed or cancelled), once: write it, free its slot and its lease, delete its token,
-- index it for retention, set its TTL, publish its final events (seq and seq + 1), admit the next waiting jobs.
-- KEYS: 1 job, 2 lock, 3 secret, 4 active, 5 waiting, 6 final index, 7 owner's final index, 8 durations
-- a: prefix, id, token ('' = no lease check, a cancel), now, max, ttl, status, fields, news, cancelled_channel,
--    announce_cancel (workers abort the job's call in flight), record_duration (for ETAs)
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2, {}} end
if a.token ~= '' and redis.call('GET', KEYS[2]) ~= a.token then return {-1, {}} end
if TERMINAL[redis.call('HGET', KEYS[1], 'status')] then return {-3, {}} end
redis.call('HSET', KEYS[1], 'status', a.status, unpack(flat(a.fields)))
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], a.id)
redis.call('ZREM', KEYS[5], a.id)
redis.call('ZADD', KEYS[6], a.now, a.id)
retain(KEYS[6], a.now, a.ttl)
redis.call('EXPIRE', KEYS[1], a.ttl)
if redis.call('HGET', KEYS[1], 'owner') then
  redis.call('ZADD', KEYS[7], a.now, a.id)
  retain(KEYS[7], a.now, a.ttl)
end
local dedup = redis.call('HGET', KEYS[1], 'dedup_key')  -- a key name the submit stored: known only now
if dedup and redis.call('GET', dedup) == a.id then redis.call('DEL', dedup) end
if a.announce_cancel then redis.call('PUBLISH', a.cancelled_channel, a.id) end
if a.record_duration then
  redis.call('LPUSH', KEYS[8], a.now - tonumber(redis.call('HGET', KEYS[1], 'admitted_at') or a.now))
  redis.call('LTRIM', KEYS[8], 0, 49)
end
redis.call('HSET', KEYS[1], 'emitted_at', a.now)
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 2) - 1
broadcast(a.news, seq)
return {seq, admit(KEYS[5], KEYS[4], a.max, a.now)}
