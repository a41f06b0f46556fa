-- Lifecycle events: record one connection's change, or settle due grace
-- periods; append the resulting events to the log with their per-subject
-- seq. Not Redis-Cluster-safe (key names are built here), as the bus's
-- other scripts.
-- ARGV[1]  P, the key prefix (`<bus_prefix>:ev`)
-- ARGV[2]  op: connect | subscribe | unsubscribe | disconnect | settle
-- ARGV[3]  client id ('' for settle)
-- ARGV[4]  user id ('' when anonymous; connect only)
-- ARGV[5]  channel (subscribe, unsubscribe)
-- ARGV[6]  instance id: who emits
-- ARGV[7]  now, unix ms
-- ARGV[8]  id nonce (random, per call): event ids are `<nonce>-<n>`
-- ARGV[9]  grace ms
-- ARGV[10] close code (disconnect)
-- ARGV[11] close reason (disconnect)
-- ARGV[12] approximate MAXLEN of the log
-- ARGV[13] owner: the instance whose record holds the client (itself,
--          or a dead instance being reaped)
-- ARGV[14] seq key lifetime ms for user and channel subjects
-- Returns the number of events appended.
local p, op, client, user, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local inst, now, nonce, grace = ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local owner, seq_ttl = ARGV[13], ARGV[14]
local n = 0

local function emit(typ, subject, fields)
  n = n + 1
  local seq_key = p .. ':seq:' .. subject
  local seq = redis.call('INCR', seq_key)
  if string.sub(subject, 1, 7) ~= 'client:' then
    redis.call('PEXPIRE', seq_key, seq_ttl)
  end
  local ev = {id = nonce .. '-' .. n, type = typ, subject = subject, seq = seq, time = now,
    instanceId = inst, clientId = cjson.null, userId = cjson.null, channel = cjson.null}
  for k, v in pairs(fields) do ev[k] = v end
  redis.call('XADD', p .. ':log', 'MAXLEN', '~', ARGV[12], '*', 'e', cjson.encode(ev), 't', now)
end

local function nullable(s)
  if s == nil or s == '' then return cjson.null end
  return s
end

-- A client joins a user or channel subject: the first member emits
-- online/occupied, unless the subject was pending (back within the grace).
local function join(subject, typ, fields)
  local set = p .. ':m:' .. subject
  if redis.call('SADD', set, client) == 1 and redis.call('SCARD', set) == 1 then
    if redis.call('ZREM', p .. ':pending', subject) == 0 then
      emit(typ, subject, fields)
    end
  end
end

-- A client leaves: the last member makes the subject pending for the grace.
local function leave(subject)
  local set = p .. ':m:' .. subject
  if redis.call('SREM', set, client) == 1 and redis.call('SCARD', set) == 0 then
    redis.call('ZADD', p .. ':pending', now + grace, subject)
  end
end

if op == 'settle' then
  local due = redis.call('ZRANGEBYSCORE', p .. ':pending', '-inf', now, 'LIMIT', 0, 100)
  for _, subject in ipairs(due) do
    redis.call('ZREM', p .. ':pending', subject)
    if redis.call('SCARD', p .. ':m:' .. subject) == 0 then
      if string.sub(subject, 1, 5) == 'user:' then
        emit('user_offline', subject, {userId = string.sub(subject, 6)})
      else
        emit('channel_vacated', subject, {channel = string.sub(subject, 9)})
      end
    end
  end
  return n
end

local records = p .. ':inst:' .. owner
local client_subject = 'client:' .. client

if op == 'connect' then
  if redis.call('HEXISTS', records, client) == 1 then return 0 end
  redis.call('HSET', records, client, cjson.encode({u = user, ch = {}}))
  emit('connect', client_subject, {clientId = client, userId = nullable(user)})
  if user ~= '' then
    join('user:' .. user, 'user_online', {clientId = client, userId = user})
  end
  return n
end

local raw = redis.call('HGET', records, client)
if not raw then return 0 end
local rec = cjson.decode(raw)
local uid = nullable(rec.u)

if op == 'subscribe' then
  if rec.ch[channel] then return 0 end
  rec.ch[channel] = 1
  redis.call('HSET', records, client, cjson.encode(rec))
  local fields = {clientId = client, userId = uid, channel = channel}
  emit('subscribe', client_subject, fields)
  join('channel:' .. channel, 'channel_occupied', fields)
elseif op == 'unsubscribe' then
  if not rec.ch[channel] then return 0 end
  rec.ch[channel] = nil
  redis.call('HSET', records, client, cjson.encode(rec))
  emit('unsubscribe', client_subject, {clientId = client, userId = uid, channel = channel})
  leave('channel:' .. channel)
elseif op == 'disconnect' then
  local channels = {}
  for ch in pairs(rec.ch) do table.insert(channels, ch) end
  table.sort(channels)
  for _, ch in ipairs(channels) do
    emit('unsubscribe', client_subject, {clientId = client, userId = uid, channel = ch})
    leave('channel:' .. ch)
  end
  redis.call('HDEL', records, client)
  emit('disconnect', client_subject, {clientId = client, userId = uid,
    code = tonumber(ARGV[10]), reason = ARGV[11]})
  redis.call('DEL', p .. ':seq:' .. client_subject)
  if rec.u ~= '' then leave('user:' .. rec.u) end
end
return n
