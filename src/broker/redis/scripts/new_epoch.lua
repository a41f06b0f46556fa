-- Move a channel whose history was rewritten under its subscribers (a
-- write Redis lost: see recovery.rs) to a new epoch, if it is still in
-- the epoch the caller saw (the first instance to find out does it).
-- Offsets and the stream stay; positions of the old epoch no longer
-- recover.
--
-- KEYS: meta.
-- ARGV: the epoch seen, the new epoch.
-- Returns 1 when moved, 0 when the channel was elsewhere already.
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return 1
end
return 0
