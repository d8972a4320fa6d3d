-- One Potpie parse in flight per repository key, shared by every job and worker (store/flights.py).
-- KEYS: 1 the flight's hash, 2 the recent parse durations (a list, newest first).
-- a: op, now, and per op: job, claim_s, ttl_s (join, release); project_id, status, ttl_s, done_ttl_s (publish);
--    max_age, claim_s (poll); status, done_ttl_s (record).
-- The hash: leader and claim_until (the job sending /parse, while its claim lasts), requested (a leader may
-- have sent /parse), project_id, status, started_at, polled_at, poll_until (a job is polling Potpie for everyone), members
-- (how many jobs joined; `m:<job>` marks each once).
local f = KEYS[1]
local function num(name) return tonumber(redis.call('HGET', f, name) or '0') or 0 end
local function field(name) return redis.call('HGET', f, name) or '' end

-- The mean of the last parses' durations (s), '' when none finished yet: what a progress estimate divides by.
local function expected()
  local recent = redis.call('LRANGE', KEYS[2], 0, 19)
  if #recent == 0 then return '' end
  local total = 0
  for _, d in ipairs(recent) do total = total + tonumber(d) end
  return tostring(total / #recent)
end

-- A parse that has ended: ready stays a while for later jobs to skip /parse; error goes, so the next job asks
-- Potpie to parse again.
local function ended(status)
  if status == 'error' then redis.call('DEL', f) else redis.call('EXPIRE', f, math.ceil(a.done_ttl_s)) end
end

if a.op == 'join' then
  if redis.call('HSETNX', f, 'm:' .. a.job, 1) == 1 then redis.call('HINCRBY', f, 'members', 1) end
  local project = field('project_id')
  if project ~= '' then
    return {'follow', project, field('status'), tostring(num('started_at')), expected()}
  end
  local leader = field('leader')
  if leader ~= '' and leader ~= a.job and num('claim_until') > a.now then return {'wait', leader} end
  local requested = field('requested')  -- before this leader: may an earlier /parse have reached Potpie?
  redis.call('HSET', f, 'leader', a.job, 'claim_until', a.now + a.claim_s, 'requested', '1')
  redis.call('EXPIRE', f, math.ceil(a.ttl_s))
  return {'lead', requested, expected()}
elseif a.op == 'drop' then  -- the parse outlived PARSE_TIMEOUT: the next job asks Potpie again
  redis.call('DEL', f)
  return 1
elseif a.op == 'release' then
  if field('leader') == a.job then redis.call('HSET', f, 'leader', '', 'claim_until', 0) end
  return 1
elseif a.op == 'publish' then
  redis.call('HSET', f, 'project_id', a.project_id, 'status', a.status, 'started_at', a.now, 'polled_at', a.now,
             'leader', '', 'claim_until', 0)
  if a.status == 'ready' or a.status == 'error' then ended(a.status) else redis.call('EXPIRE', f, math.ceil(a.ttl_s)) end
  return 1
elseif a.op == 'poll' then
  if redis.call('EXISTS', f) == 0 then return {'gone', '', '0', expected(), '0'} end
  local status, started, members = field('status'), tostring(num('started_at')), tostring(num('members'))
  local fresh = a.now - num('polled_at') < a.max_age
  if status == 'ready' or status == 'error' or fresh or num('poll_until') > a.now then
    return {'cached', status, started, expected(), members}
  end
  if num('members') > 1 then redis.call('HSET', f, 'poll_until', a.now + a.claim_s) end  -- alone: no one to tell
  return {'poll', status, started, expected(), members}
elseif a.op == 'record' then
  if redis.call('EXISTS', f) == 0 then return 0 end
  local before, started = field('status'), num('started_at')
  redis.call('HSET', f, 'status', a.status, 'polled_at', a.now, 'poll_until', 0)
  if a.status == 'ready' and before ~= 'ready' and started > 0 then
    redis.call('LPUSH', KEYS[2], a.now - started)
    redis.call('LTRIM', KEYS[2], 0, 49)
  end
  if a.status == 'ready' or a.status == 'error' then ended(a.status) end
  return 1
end
return redis.error_reply('flight: unknown op ' .. tostring(a.op))
