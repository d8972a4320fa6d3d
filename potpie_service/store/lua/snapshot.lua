-- Everything /metrics reads from Redis, in one round trip: queue depth, jobs in flight, the oldest waiting job's
-- submission time, workers seen recently, jobs ever submitted, the metrics hash.
-- KEYS: 1 waiting, 2 active, 3 workers, 4 tickets, 5 metrics.   a: prefix, since
local head = redis.call('ZRANGE', KEYS[1], 0, 0)
local oldest = ''
if #head > 0 then oldest = redis.call('HGET', job_key(head[1]), 'created_ts') or '' end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), oldest,
        redis.call('ZCOUNT', KEYS[3], a.since, '+inf'), redis.call('GET', KEYS[4]) or '0',
        redis.call('HGETALL', KEYS[5])}
