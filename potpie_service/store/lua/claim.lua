-- The lease on one step of a job: only the delivery for the job's current seq may take it.
-- KEYS: 1 job, 2 lock.   a: seq, token, ttl_ms
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if TERMINAL[redis.call('HGET', KEYS[1], 'status')] then return {'done'} end
if redis.call('HGET', KEYS[1], 'seq') ~= tostring(a.seq) then return {'stale'} end
if not redis.call('SET', KEYS[2], a.token, 'NX', 'PX', a.ttl_ms) then return {'busy'} end
return {'ok', redis.call('HGETALL', KEYS[1])}
