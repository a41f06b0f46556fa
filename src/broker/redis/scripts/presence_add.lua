-- Presence add: the member's info and its expiry `ttl` ahead.
--
-- KEYS: members, expiry.
-- ARGV: client id, info JSON, ttl ms; for the heartbeat's refresh also the
--       channel's topic and the channel's name as a JSON string: a member
--       that is not in the hash any more (reaped with a `leave` while its
--       instance was cut off, or lost with Redis's data) is announced again
--       with a `join`; then the publish command (PUBLISH, or SPUBLISH in a
--       cluster).
-- Returns 1 when the member was not in the hash.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if new == 1 and ARGV[4] then
  redis.call(ARGV[6], ARGV[4],
    'c {"kind":"join","channel":' .. ARGV[5] .. ',"info":' .. ARGV[2] .. '}')
end
return new
