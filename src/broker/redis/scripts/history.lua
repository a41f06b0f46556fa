-- History read; writes nothing.
--
-- KEYS: meta, stream, generation.
-- ARGV: since epoch or '', since offset, limit (-1: all), fallback epoch,
-- size, '1' for the newest first, '1' to create the generation when it is
-- absent (cluster mode: one generation per slot, created by the slot's
-- first read; one Redis restores its one generation in the heartbeat).
-- Returns {epoch, top, {{offset, body}…}} (oldest first, or newest first).
--
-- An absent stream reports the current generation (the epoch its first
-- publication will carry) at offset 0, or `fallback` (never stored) when
-- the generation key is gone too.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local gen = redis.call('GET', KEYS[3])
  if not gen and ARGV[7] == '1' then
    redis.call('SET', KEYS[3], ARGV[4])
    gen = ARGV[4]
  end
  return {gen or ARGV[4], 0, {}}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local out = {}
local limit = tonumber(ARGV[3])
if limit ~= 0 and (ARGV[1] == '' or ARGV[1] == epoch) then
  local after = math.max(tonumber(ARGV[2]), top - tonumber(ARGV[5]))
  local entries
  if ARGV[6] == '1' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '(0-' .. after)
  else
    entries = redis.call('XRANGE', KEYS[2], '(0-' .. after, '+')
  end
  for _, e in ipairs(entries) do
    if limit > 0 and #out >= limit then break end
    local f = e[2]
    local body, exp
    for i = 1, #f, 2 do
      if f[i] == 'b' then body = f[i + 1] elseif f[i] == 'x' then exp = tonumber(f[i + 1]) end
    end
    if body and exp and exp > now then
      out[#out + 1] = {tonumber(string.sub(e[1], 3)), body}
    end
  end
end
return {epoch, top, out}
