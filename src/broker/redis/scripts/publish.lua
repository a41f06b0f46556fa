-- Atomic publish: idempotency key, expected offset, epoch, offset,
-- append, fan-out.
--
-- KEYS: meta, stream, generation, idempotency key (meta when unused; all
-- in the channel's hash slot but the generation).
-- ARGV: topic, body, size, ttl ms, next generation, fallback epoch,
-- '1' when KEYS[4] is an idempotency key, its window ms, expected offset
-- ('' for none), the publish command (PUBLISH, or SPUBLISH in a cluster:
-- the topic is in the channel's slot).
--
-- In a cluster the generation is the per-slot key of the channel's slot,
-- so every key (and the shard channel) is in one slot.
-- Returns {epoch, offset, outcome}: outcome 0 published, 1 duplicate (the
-- first publication's position), 2 offset mismatch (the current top;
-- nothing written).
--
-- A new stream takes the deployment's current generation as its epoch
-- (what reads of the absent stream reported) and moves the generation on,
-- so no two streams ever carry the same epoch. Every key it writes
-- expires `ttl` after this publish (the idempotency key: its window).
if ARGV[7] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    return {string.sub(seen, 1, sep - 1), tonumber(string.sub(seen, sep + 1)), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if ARGV[9] ~= '' then
  local top = 0
  if epoch then
    top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
  end
  if top ~= tonumber(ARGV[9]) then
    return {epoch or redis.call('GET', KEYS[3]) or ARGV[6], top, 2}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not epoch then
  epoch = redis.call('GET', KEYS[3]) or ARGV[6]
  redis.call('SET', KEYS[3], ARGV[5])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('DEL', KEYS[2])
end
local top = redis.call('HINCRBY', KEYS[1], 'top', 1)
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, '0-' .. top, 'b', ARGV[2], 'x', now + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[4], epoch .. ' ' .. top, 'PX', ARGV[8])
end
redis.call(ARGV[10], ARGV[1], 'p ' .. epoch .. ' ' .. top .. ' ' .. ARGV[2])
return {epoch, top, 0}
