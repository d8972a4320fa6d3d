-- Shared by every script of the job store (prepended when the store loads a script). Each script takes its
-- arguments by name, as one JSON object in ARGV[1] (`a` below), and declares in KEYS every key it knows before
-- it runs. Only keys a script learns while it runs (the job a dedup key points at, the jobs admission lets in)
-- are built here, from the prefix, by job_key: the same layout as store/keys.py.
local a = cjson.decode(ARGV[1])
local TERMINAL = {@TERMINAL@}  -- core.model.TERMINAL; the loader fills in these and @QUEUED@

local function job_key(id) return a.prefix .. 'job:' .. id end

local function flat(fields)  -- {name = value} -> name, value, ... for HSET
  local out = {}
  for name, value in pairs(fields) do
    out[#out + 1] = name
    out[#out + 1] = value
  end
  return out
end

-- A retention index keeps entries for `ttl` seconds and vanishes `ttl` after its last entry (no unbounded growth).
local function retain(index, now, ttl)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl)
  redis.call('EXPIRE', index, math.ceil(ttl))
end

-- Moves the head of the waiting line into free slots while MAX_CONCURRENT_JOBS allows; returns their ids.
local function admit(waiting, active, max, now)
  local admitted = {}
  while redis.call('ZCARD', active) < max do
    local head = redis.call('ZRANGE', waiting, 0, 0)
    if #head == 0 then break end
    local id = head[1]
    redis.call('ZREM', waiting, id)
    if redis.call('EXISTS', job_key(id)) == 1 then
      redis.call('ZADD', active, now, id)
      redis.call('HSET', job_key(id), 'admitted_at', now, 'next_due', now)
      table.insert(admitted, id)
    end
  end
  return admitted
end

-- Publishing in the script that takes the seq makes a state change and its announcement one atomic step: no
-- crash in between can commit a change without telling the job's room, or tell of one that was refused. In
-- message i the JSON string "@seq:<nonce>" becomes the number seq + i.
local function broadcast(news, seq)
  if news.channel == '' then return end
  local marker = '"@seq:' .. news.nonce .. '"'
  for i, message in ipairs(news.messages) do
    redis.call('PUBLISH', news.channel, (string.gsub(message, marker, tostring(seq + i - 1))))
  end
end

-- Counts one request against each limit's window (fixed windows, opened by a client's first request): for each
-- key, its count and the ms left in its window (store/ratelimit.py).
local function hit_limits(keys, windows_ms)
  local out = {}
  for i, key in ipairs(keys) do
    local count = redis.call('INCR', key)
    local left = redis.call('PTTL', key)
    if count == 1 or left < 0 then
      redis.call('PEXPIRE', key, windows_ms[i])
      left = windows_ms[i]
    end
    out[#out + 1] = count
    out[#out + 1] = left
  end
  return out
end

-- The same counts and ms left, read without counting (a request already counted, sent again).
local function read_limits(keys, windows_ms)
  local out = {}
  for i, key in ipairs(keys) do
    local left = redis.call('PTTL', key)
    out[#out + 1] = tonumber(redis.call('GET', key) or '0')
    out[#out + 1] = left >= 0 and left or windows_ms[i]
  end
  return out
end
