--[[
limiter.lua: the one atomic step of the shared rate limiter (one EVALSHA per call).

This is proxy/ratelimit/gcra.py, statement for statement (same order, same tie rules); the test
suite runs one sequence through both and compares every decision.

Invariants
  * One clock: redis TIME (microseconds). No caller-supplied time is used, so every replica
    decides on the same clock whatever its own. Redis 7 replicates script effects, so TIME is
    allowed before writes.
  * All-or-nothing: nothing is consumed unless every constraint (configured windows, the group's
    windows, this member's fair share, learned policies, blocked_until) admits the call.
  * Learned state is monotonic: blocked_until only grows; within one reset window (|delta| < 1 s)
    a policy's remaining only goes down; an earlier reset is stale and ignored; a policy past its
    reset is dropped. Every admitted call decrements every live policy, so all replicas count
    down together between upstream responses.
  * Every key written gets a PEXPIRE: past the latest absolute time a hash records, its state is
    equivalent to no state at all, so it expires then (plus a margin). Nothing lives forever.
  * All KEYS share one hash tag ({rl:<scope>} or {rlq:<quota_key>}): valid on Redis Cluster.
  * Numbers are integral microseconds (< 2^53, exact in Lua doubles); only a member's fair-share
    increment is computed in floating point and floored, exactly as gcra.member_inc does.

KEYS[1]  scope hash:  b = blocked_until; p:<name> = "remaining reset limit window" (-1 unknown);
                      c:<sig> = TAT of a configured window; m:<sig> = TAT of this member's share
KEYS[2]  group hash:  q:<sig> = TAT of a group window            (grouped targets only)
KEYS[3]  group zset:  member -> last active time                  (grouped targets only)
KEYS[4]  group hash:  member -> weight                            (grouped targets only)

ARGV[1] = 'a' (acquire) | 'p' (peek: read only) | 'o' (observe)
  a/p: cost, reserve, member, weight, ncells, ncells x (sig, inc, tau), nquota, nquota x (sig, inc, tau, horizon)
       -> {allowed, wait, wait_src, remaining, reset, next_wait, state_src, next_src, now}
  o:   blocked_until (0 = none), n, n x (name, remaining, reset, limit, window)  -> {now, fresh}
       fresh = 1 when the scope had no live learned state before and has some now: replicas
       that cached "nothing learned here" must be told (the caller announces it). This is
       reporting only, with no decision in it, so gcra.py has no counterpart.
Sources: 0 none, 1 configured, 2 learned.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local US = 1000000
local MARGIN_MS = 1000
local mode = ARGV[1]
local skey = KEYS[1]

local function int(n) return string.format('%d', n) end

-- floor(a / b) for integers, exact even where the double quotient rounds
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function ttl_ms(latest)
  local ms = math.ceil((latest - now) / 1000)
  if ms < 0 then ms = 0 end
  return ms + MARGIN_MS
end

-- load the scope state
local tats, pol, blocked = {}, {}, 0
local raw = redis.call('HGETALL', skey)
for i = 1, #raw, 2 do
  local f, v = raw[i], raw[i + 1]
  if f == 'b' then
    blocked = tonumber(v)
  elseif string.sub(f, 1, 2) == 'p:' then
    local r, rs, l, w = string.match(v, '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$')
    if r then pol[string.sub(f, 3)] = {tonumber(r), tonumber(rs), tonumber(l), tonumber(w)} end
  else
    tats[f] = tonumber(v)
  end
end

local function scope_latest()
  local latest = blocked
  for _, v in pairs(tats) do if v > latest then latest = v end end
  for _, p in pairs(pol) do if p[2] > latest then latest = p[2] end end
  return latest
end

-- drop what is past (no semantic change: past entries are ignored anyway)
local function prune()
  if blocked > 0 and blocked <= now then
    blocked = 0
    redis.call('HDEL', skey, 'b')
  end
  for name, p in pairs(pol) do
    if p[2] <= now then
      pol[name] = nil
      redis.call('HDEL', skey, 'p:' .. name)
    end
  end
end

local function put_policy(name, p)
  redis.call('HSET', skey, 'p:' .. name, int(p[1]) .. ' ' .. int(p[2]) .. ' ' .. int(p[3]) .. ' ' .. int(p[4]))
end

local function learned_live()
  if blocked > now then return true end
  for _, p in pairs(pol) do if p[2] > now then return true end end
  return false
end

if mode == 'o' then
  local was_live = learned_live()
  local b = tonumber(ARGV[2])
  local wrote = false
  if b > now and b > blocked then
    blocked = b
    redis.call('HSET', skey, 'b', int(b))
    wrote = true
  end
  local n = tonumber(ARGV[3])
  for i = 0, n - 1 do
    local j = 4 + i * 5
    local name = ARGV[j]
    local nw = {tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])}
    local old = pol[name]
    if old and old[2] <= now then old = nil end
    local merged = nil
    if nw[2] > now then
      if old == nil or nw[2] - old[2] >= US then
        merged = nw                                   -- a later window replaces
      elseif old[2] - nw[2] < US then                 -- the same window: remaining only goes down
        merged = {math.min(old[1], nw[1]), math.max(old[2], nw[2]),
                  nw[3] >= 0 and nw[3] or old[3], nw[4] >= 0 and nw[4] or old[4]}
      end                                             -- else: earlier reset = stale, ignored
    end
    if merged then
      pol[name] = merged
      put_policy(name, merged)
      wrote = true
    end
  end
  prune()
  if wrote then redis.call('PEXPIRE', skey, ttl_ms(scope_latest())) end
  local fresh = 0
  if not was_live and learned_live() then fresh = 1 end
  return {now, fresh}
end

local commit = mode == 'a'
local cost = tonumber(ARGV[2])
local reserve = tonumber(ARGV[3])
local member = ARGV[4]
local weight = tonumber(ARGV[5])
local nc = tonumber(ARGV[6])
local qbase = 7 + nc * 3
local nq = tonumber(ARGV[qbase])
local grouped = #KEYS == 4 and nq > 0

if commit then prune() end

-- learned constraints first: they answer "the upstream said no"
local wait, wsrc, learned_deny = 0, 0, false
if blocked > now then wait, wsrc, learned_deny = blocked - now, 2, true end
for _, p in pairs(pol) do
  if p[2] > now and p[1] - cost < reserve then
    learned_deny = true
    if p[2] - now > wait then wait, wsrc = p[2] - now, 2 end
  end
end

-- fair share: sum of weights of members active within each quota window's horizon
local gtats, shares, hmax = {}, {}, 0
if grouped then
  for i = 0, nq - 1 do
    local h = tonumber(ARGV[qbase + 1 + i * 4 + 3])
    if h > hmax then hmax = h end
  end
  local graw = redis.call('HGETALL', KEYS[2])
  for i = 1, #graw, 2 do gtats[graw[i]] = tonumber(graw[i + 1]) end
  local wraw = redis.call('HGETALL', KEYS[4])
  local weights = {}
  for i = 1, #wraw, 2 do weights[wraw[i]] = tonumber(wraw[i + 1]) end
  local act = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. int(now - hmax), '+inf', 'WITHSCORES')
  for i = 0, nq - 1 do
    local h = tonumber(ARGV[qbase + 1 + i * 4 + 3])
    local s = weight
    for k = 1, #act, 2 do
      if act[k] ~= member and tonumber(act[k + 1]) > now - h then s = s + (weights[act[k]] or 1.0) end
    end
    shares[i] = s
  end
end

-- every GCRA constraint, in gcra.evaluate's order: {table, field, inc, tau}
local checks = {}
for i = 0, nc - 1 do
  local j = 7 + i * 3
  checks[#checks + 1] = {tats, 'c:' .. ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])}
end
if grouped then
  for i = 0, nq - 1 do
    local j = qbase + 1 + i * 4
    local sig, inc, tau = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    checks[#checks + 1] = {gtats, 'q:' .. sig, inc, tau}
    -- member increment: T * share / weight (alone: T), capped so one call fits the tolerance
    local minc = math.floor(inc * shares[i] / weight)
    local cap = idiv(tau, cost)
    if minc > cap then minc = cap end
    if minc < 1 then minc = 1 end
    checks[#checks + 1] = {tats, 'm:' .. sig, minc, tau}
  end
end

local news = {}
for _, c in ipairs(checks) do
  local tat = c[1][c[2]] or 0
  local base = tat
  if base < now then base = now end
  local nt = base + c[3] * cost
  local over = nt - now - c[4]
  if over > 0 then
    if over > wait then wait, wsrc = over, 1 end
  else
    news[#news + 1] = {c[1], c[2], nt}
  end
end
local allowed = wait == 0

if commit then
  if grouped and not learned_deny then
    -- activity: prune members idle past the longest horizon, then mark this one
    local idle = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', int(now - hmax))
    if #idle > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', int(now - hmax))
      for _, m in ipairs(idle) do redis.call('HDEL', KEYS[4], m) end
    end
    redis.call('ZADD', KEYS[3], int(now), member)
    redis.call('HSET', KEYS[4], member, ARGV[5])
    local ms = math.ceil(hmax / 1000) + MARGIN_MS
    redis.call('PEXPIRE', KEYS[3], ms)
    redis.call('PEXPIRE', KEYS[4], ms)
  end
  if allowed then
    local swrote, gwrote = false, false
    for _, n in ipairs(news) do
      n[1][n[2]] = n[3]
      if n[1] == gtats then
        redis.call('HSET', KEYS[2], n[2], int(n[3]))
        gwrote = true
      else
        redis.call('HSET', skey, n[2], int(n[3]))
        swrote = true
      end
    end
    for name, p in pairs(pol) do
      p[1] = math.max(0, p[1] - cost)
      put_policy(name, p)
      swrote = true
    end
    if swrote then redis.call('PEXPIRE', skey, ttl_ms(scope_latest())) end
    if gwrote then
      local latest = 0
      for _, v in pairs(gtats) do if v > latest then latest = v end end
      redis.call('PEXPIRE', KEYS[2], ttl_ms(latest))
    end
  end
end

-- the state afterwards: most constraining remaining (ties: later reset) and the longest wait
local rem, rst, nwt, ssrc, nsrc = -1, -1, 0, 0, 0
local function post(r, rs, w, src)
  if w > nwt then nwt, nsrc = w, src end
  if rem < 0 or r < rem or (r == rem and rs > rst) then rem, rst, ssrc = r, rs, src end
end
if blocked > now then post(0, blocked, blocked - now, 2) end
for _, p in pairs(pol) do
  if p[2] > now then
    local e = p[1] - reserve
    if e < 0 then e = 0 end
    local w = 0
    if e < 1 then w = p[2] - now end
    post(e, p[2], w, 2)
  end
end
for _, c in ipairs(checks) do
  local base = c[1][c[2]] or 0
  if base < now then base = now end
  local r = idiv(c[4] - (base - now), c[3])
  if r < 0 then r = 0 end
  local w = base + c[3] - now - c[4]
  if w < 0 then w = 0 end
  post(r, base, w, 1)
end

return {allowed and 1 or 0, wait, wsrc, rem, rst, nwt, ssrc, nsrc, now}
