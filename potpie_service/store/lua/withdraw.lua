-- Take back a job that submit created but the replicas did not confirm (REDIS_MIN_REPLICAS_ACK): every key submit
-- wrote for it, then admission into the slot it may have held. Keys of other jobs are left as they are.
-- KEYS: 1 job, 2 waiting, 3 active, 4 owner index, 5 secret, 6 idempotency key, 7 dedup key
-- a: prefix, max, now, id
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('ZREM', KEYS[2], a.id)
redis.call('ZREM', KEYS[3], a.id)
redis.call('ZREM', KEYS[4], a.id)
if redis.call('HGET', KEYS[6], 'job_id') == a.id then redis.call('DEL', KEYS[6]) end
if redis.call('GET', KEYS[7]) == a.id then redis.call('DEL', KEYS[7]) end
return admit(KEYS[2], KEYS[3], a.max, a.now)
