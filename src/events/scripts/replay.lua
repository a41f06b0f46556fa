-- Move up to ARGV[1] dead-lettered events back into the log, each with a
-- new age (ARGV[2], now ms).
-- KEYS[1] the dead-letter log   KEYS[2] the log   ARGV[3] MAXLEN of the log
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
for _, entry in ipairs(entries) do
  local f = entry[2]
  local e
  for i = 1, #f, 2 do if f[i] == 'e' then e = f[i + 1] end end
  if e then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', e, 't', ARGV[2])
  end
  redis.call('XDEL', KEYS[1], entry[1])
end
return #entries
