-- Take or renew the delivery lease.
-- KEYS[1] the lease key   ARGV[1] this instance   ARGV[2] lifetime ms
-- Returns 1 when this instance holds it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
