-- Atomic publish: epoch, offset, append, fan-out.
--
-- KEYS: meta, stream, generation.
-- ARGV: topic, body, size, ttl ms, next generation, fallback epoch.
-- Returns {epoch, offset}.
--
-- A new stream takes the deployment's current generation as its epoch
-- (what reads of the absent stream reported) and moves the generation on,
-- so no two streams ever carry the same epoch. Every key it writes
-- expires `ttl` after this publish.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
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
redis.call('PUBLISH', ARGV[1], 'p ' .. epoch .. ' ' .. top .. ' ' .. ARGV[2])
return {epoch, top}
