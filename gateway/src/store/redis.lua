-- One all-or-nothing decision over every window of a request, run atomically by Redis.
--
-- KEYS[i]: the counter of window i; all keys carry the same client hash tag, so they share a
-- Cluster slot. ARGV[1]: the request's cost (at least 1). ARGV[2]: 0 to use Redis's clock,
-- which the gateway always does; tests pass a fake time in Unix ms. Then four per window:
-- kind ("log", "estimate", "fixed" or "bucket"), quantity, window length in ms, and burst (used
-- by buckets only).
--
-- Returns {admitted, then admits, remaining, reset_ms for each window}, with 1/0 for booleans.
-- The rules are the memory store's (sliding.rs, fixed.rs, gcra.rs), step for step, so both
-- stores give the same answers; only the clock differs: this one reads Redis's. Every counter
-- left holding something gets a TTL that ends when it would go idle, in the same call.
--
-- Lua numbers are doubles: integers are exact below 2^53, which bounds quantity × window_ms
-- (and a bucket's window in ns) far above any configured limit.

local now = tonumber(ARGV[2])
if now == 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local cost = tonumber(ARGV[1])
local NS_PER_MS = 1000000

-- Sliding log: a list of admission times (Unix ms), oldest first, one entry per unit.
local log = {}

function log.load(w)
  while true do
    local oldest = redis.call('LINDEX', w.key, 0)
    if not oldest or tonumber(oldest) + w.len > now then break end
    redis.call('LPOP', w.key)
  end
  return { count = redis.call('LLEN', w.key) }
end

function log.admits(w, s)
  return s.count + cost <= w.quantity
end

function log.record(w, s)
  local newest = redis.call('LINDEX', w.key, -1)
  local at = now
  if newest and tonumber(newest) > now then at = tonumber(newest) end
  local entries = {}
  for i = 1, cost do entries[i] = at end
  redis.call('RPUSH', w.key, unpack(entries))
  s.count = s.count + cost
end

function log.state(w, s, admits)
  local index = 0
  if not admits then
    index = math.max(s.count + cost - w.quantity, 1) - 1
  end
  local freeing = redis.call('LINDEX', w.key, index)
  if not freeing and not admits then freeing = redis.call('LINDEX', w.key, -1) end
  local reset = w.len
  if freeing then reset = math.max(tonumber(freeing) + w.len - now, 0) end
  return math.max(w.quantity - s.count, 0), math.max(reset, 1)
end

function log.save(w, s)
  local newest = redis.call('LINDEX', w.key, -1)
  if newest then redis.call('PEXPIRE', w.key, tonumber(newest) + w.len - now) end
end

-- Weighted two-window estimate: a hash of the aligned window index i, its count c and the
-- previous window's count p.
local estimate = {}

function estimate.load(w)
  local f = redis.call('HMGET', w.key, 'i', 'c', 'p')
  local s = { index = tonumber(f[1]) or 0, current = tonumber(f[2]) or 0,
              previous = tonumber(f[3]) or 0 }
  local index = math.floor(now / w.len)
  if index == s.index + 1 then
    s.previous, s.current, s.index = s.current, 0, index
  elseif index > s.index then
    s.previous, s.current, s.index = 0, 0, index
  end
  return s
end

local function weighted_previous(w, s)
  local elapsed = math.min(math.max(now - s.index * w.len, 0), w.len - 1)
  return s.previous * (w.len - elapsed)
end

function estimate.admits(w, s)
  return weighted_previous(w, s) + (s.current + cost) * w.len <= w.quantity * w.len
end

function estimate.record(w, s)
  s.current = s.current + cost
end

local function estimate_idle_at(w, s)
  if s.current > 0 then return (s.index + 2) * w.len end
  if s.previous > 0 then return (s.index + 1) * w.len end
  return 0
end

local function first_at_most(w, s, ceiling)
  local weight, spare, start = s.previous, ceiling - s.current, s.index * w.len
  if ceiling < s.current then
    weight, spare, start = s.current, ceiling, start + w.len
  end
  if weight == 0 then return now end
  local overlap = math.min(math.floor(spare * w.len / weight), w.len)
  return math.max(start + w.len - overlap, now)
end

function estimate.state(w, s, admits)
  local room = math.max(w.quantity * w.len - weighted_previous(w, s) - s.current * w.len, 0)
  local remaining = math.floor(room / w.len)
  local needed = cost
  if admits then needed = remaining + 1 end
  local reset
  if w.quantity >= needed then
    reset = math.max(first_at_most(w, s, w.quantity - needed) - now, 0)
  elseif admits then
    reset = w.len
  else
    reset = estimate_idle_at(w, s) - now
    if reset <= 0 then reset = w.len end
  end
  return remaining, math.max(reset, 1)
end

function estimate.save(w, s)
  local idle_at = estimate_idle_at(w, s)
  if idle_at <= now then
    redis.call('DEL', w.key)
    return
  end
  redis.call('HSET', w.key, 'i', s.index, 'c', s.current, 'p', s.previous)
  redis.call('PEXPIRE', w.key, idle_at - now)
end

-- Fixed window: a hash of the aligned window index i and its count n.
local fixed = {}

function fixed.load(w)
  local f = redis.call('HMGET', w.key, 'i', 'n')
  local s = { index = tonumber(f[1]) or 0, count = tonumber(f[2]) or 0 }
  local index = math.floor(now / w.len)
  if index > s.index then s.index, s.count = index, 0 end
  return s
end

function fixed.admits(w, s)
  return s.count + cost <= w.quantity
end

function fixed.record(w, s)
  s.count = s.count + cost
end

function fixed.state(w, s, admits)
  return math.max(w.quantity - s.count, 0), math.max((s.index + 1) * w.len - now, 1)
end

function fixed.save(w, s)
  if s.count == 0 then
    redis.call('DEL', w.key)
    return
  end
  redis.call('HSET', w.key, 'i', s.index, 'n', s.count)
  redis.call('PEXPIRE', w.key, math.max((s.index + 1) * w.len - now, 1))
end

-- GCRA: the theoretical arrival time in Unix ns, as a decimal string. It is read as whole ms
-- and a nanosecond remainder, and worked on as the backlog relative to now, which stays small
-- enough to be exact.
local bucket = {}

function bucket.load(w)
  local interval = math.ceil(w.len * NS_PER_MS / w.quantity)
  local s = { interval = interval, tolerance = interval * (math.max(w.burst, 1) - 1),
              backlog = 0 }
  local tat = redis.call('GET', w.key)
  if tat and #tat > 6 then
    local tat_ms = tonumber(string.sub(tat, 1, -7))
    local tat_ns = tonumber(string.sub(tat, -6))
    if tat_ms >= now then s.backlog = (tat_ms - now) * NS_PER_MS + tat_ns end
  end
  return s
end

function bucket.admits(w, s)
  return s.backlog + math.max(cost - 1, 0) * s.interval <= s.tolerance
end

function bucket.record(w, s)
  s.backlog = s.backlog + cost * s.interval
end

function bucket.state(w, s, admits)
  local remaining = 0
  if s.tolerance >= s.backlog then
    remaining = math.floor((s.tolerance - s.backlog) / s.interval) + 1
  end
  local wait = nil
  if admits then
    if s.backlog > 0 then wait = s.backlog + remaining * s.interval - s.tolerance end
  elseif cost <= math.max(w.burst, 1) then
    wait = s.backlog + (cost - 1) * s.interval - s.tolerance
  else
    wait = s.backlog
  end
  local reset = w.len
  if wait and wait > 0 then reset = math.ceil(wait / NS_PER_MS) end
  return remaining, reset
end

function bucket.save(w, s)
  if s.backlog <= 0 then
    redis.call('DEL', w.key)
    return
  end
  local tat_ms = now + math.floor(s.backlog / NS_PER_MS)
  local tat = string.format('%d%06d', tat_ms, s.backlog % NS_PER_MS)
  redis.call('SET', w.key, tat, 'PX', math.ceil(s.backlog / NS_PER_MS))
end

local rules = { log = log, estimate = estimate, fixed = fixed, bucket = bucket }

-- Load and advance every window, then check them all before any records.
local windows = {}
local admitted = true
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 4
  local w = { key = KEYS[i], rule = rules[ARGV[at + 1]], quantity = tonumber(ARGV[at + 2]),
              len = math.max(tonumber(ARGV[at + 3]), 1), burst = tonumber(ARGV[at + 4]) }
  w.state = w.rule.load(w)
  w.admits = w.rule.admits(w, w.state)
  admitted = admitted and w.admits
  windows[i] = w
end

local reply = { admitted and 1 or 0 }
for i, w in ipairs(windows) do
  if admitted then w.rule.record(w, w.state) end
  local remaining, reset = w.rule.state(w, w.state, w.admits)
  w.rule.save(w, w.state)
  reply[#reply + 1] = w.admits and 1 or 0
  reply[#reply + 1] = remaining
  reply[#reply + 1] = reset
end
return reply
