-- Move the delivery cursor, only for the lease holder (a holder that lost
-- the lease while it waited must not move it), and drop the delivered
-- events from the log.
-- KEYS[1] the lease key   KEYS[2] the cursor key   KEYS[3] the log
-- ARGV[1] this instance   ARGV[2] the new cursor (a log entry id)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[2])
return 1
