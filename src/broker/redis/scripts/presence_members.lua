-- Presence members, dropping expired ones (the members of an instance that
-- crashed, or was cut off the bus for longer than presence_ttl). Each
-- dropped member's `leave` is published on the channel's topic here, in
-- the same step as its removal, so exactly one caller across the cluster
-- announces it.
--
-- KEYS: members, expiry.
-- ARGV: the channel's topic, the channel's name as a JSON string,
--       "reap" to return only the number dropped (else every live member),
--       the publish command (PUBLISH, or SPUBLISH in a cluster).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  local info = redis.call('HGET', KEYS[1], id)
  redis.call('HDEL', KEYS[1], id)
  if info then
    redis.call(ARGV[4], ARGV[1],
      'c {"kind":"leave","channel":' .. ARGV[2] .. ',"info":' .. info .. '}')
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if ARGV[3] == 'reap' then
  return #dead
end
return redis.call('HVALS', KEYS[1])
