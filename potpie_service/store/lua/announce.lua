-- A waiting job's new place in line: recorded, given the next event seq and published, only while it is still
-- queued; a job that started, ended or expired is left untouched (no seq spent, no expired record brought back).
-- KEYS: 1 job.   a: position, news
if redis.call('HGET', KEYS[1], 'status') ~= '@QUEUED@' then return 0 end
redis.call('HSET', KEYS[1], 'announced_position', a.position)
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
broadcast(a.news, seq)
return seq
