-- A new job at the back of the line, then admission of what fits; a job admitted at once has its first step pushed
-- onto the Celery queue here (its message built by celery_message.FirstSteps) and is left out of the admitted list returned.
-- KEYS: 1 job, 2 waiting, 3 active, 4 tickets, 5 owner index, 6 secret, 7 idempotency key, 8 dedup key,
--       9 the Celery queue (kombu's list), 10... the caller's rate-limit counters (none: not limited here)
-- a: prefix, max, now, id, fields, secret ('' for none), secret_ttl, use_idempotency, request_hash,
--    idempotency_ttl, use_dedup, owner_ttl, step_event_channel, rate_windows_ms, rate_amounts,
--    deadline_ms (on Redis' clock; 0: none)
-- ARGV[2]: the first step's message ('' for none), ARGV[3]: its task-sent event
-- Returns {outcome, job id, rank, admitted, rate counts, Redis' time in ms}; over a rate limit nothing is stored
-- ('limited'); past the deadline nothing is done ('late': the API answered 503 already, or is about to).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = {}
local function found(outcome, id) return {outcome, id, -1, {}, rate, now_ms} end  -- no job created
if redis.call('EXISTS', KEYS[1]) == 1 then  -- the same submit again (a retried pipeline): it is done, and counted
  if #KEYS > 9 then rate = read_limits({unpack(KEYS, 10)}, a.rate_windows_ms) end
  return {'created', a.id, redis.call('ZRANK', KEYS[2], a.id) or -1, {}, rate, now_ms}
end
if a.deadline_ms > 0 and now_ms > a.deadline_ms then return found('late', '') end
if #KEYS > 9 then
  rate = hit_limits({unpack(KEYS, 10)}, a.rate_windows_ms)
  for i, amount in ipairs(a.rate_amounts) do
    if rate[2 * i - 1] > amount then return found('limited', '') end
  end
end
if a.use_idempotency then
  local seen = redis.call('HMGET', KEYS[7], 'job_id', 'hash')
  if seen[1] then
    if seen[2] ~= a.request_hash then return found('conflict', seen[1]) end
    return found('replayed', seen[1])
  end
end
if a.use_dedup then
  local other = redis.call('GET', KEYS[8])
  if other then
    local status = redis.call('HGET', job_key(other), 'status')
    if status and not TERMINAL[status] then return found('duplicate', other) end
  end
end
local ticket = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'ticket', ticket, unpack(flat(a.fields)))
redis.call('ZADD', KEYS[2], ticket, a.id)
redis.call('ZADD', KEYS[5], a.now, a.id)
retain(KEYS[5], a.now, a.owner_ttl)
if a.secret ~= '' then redis.call('SET', KEYS[6], a.secret, 'EX', a.secret_ttl) end
if a.use_idempotency then
  redis.call('HSET', KEYS[7], 'job_id', a.id, 'hash', a.request_hash)
  redis.call('EXPIRE', KEYS[7], a.idempotency_ttl)
end
if a.use_dedup then
  redis.call('SET', KEYS[8], a.id)
  redis.call('HSET', KEYS[1], 'dedup_key', KEYS[8])
end
local admitted = admit(KEYS[2], KEYS[3], a.max, a.now)
if ARGV[2] ~= '' then
  for i, id in ipairs(admitted) do
    if id == a.id then
      redis.call('LPUSH', KEYS[9], ARGV[2])
      redis.call('PUBLISH', a.step_event_channel, ARGV[3])
      table.remove(admitted, i)
      break
    end
  end
end
local rank = redis.call('ZRANK', KEYS[2], a.id)
return {'created', a.id, rank or -1, admitted, rate, now_ms}
