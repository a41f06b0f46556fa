// Reconnect when the server itself goes away: killed, restarted on the same
// port, frozen. Each test runs its own server so it can mistreat it.

import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { channelName, once, record, until } from './helpers.mjs';

const FAST = { reconnectBaseDelay: 50, reconnectMaxDelay: 300 };
const cleanup = [];

afterEach(async () => {
  while (cleanup.length) await cleanup.pop()();
});

function track(server) {
  cleanup.push(async () => {
    server.resume();
    await server.stop(3000);
  });
  return server;
}

function client(url, opts = {}) {
  const c = new RealtimeClient(url, { ...FAST, ...opts });
  cleanup.push(async () => c.close());
  return c;
}

async function restartOnSamePort(port) {
  // The old process released the port when it exited; retry for a moment in
  // case the OS is slow about it.
  let lastErr;
  for (let i = 0; i < 20; i++) {
    try {
      return track(await startServer({ port }));
    } catch (err) {
      lastErr = err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw lastErr;
}

test('after a crash and restart the client reconnects, resubscribes, reports recovery-failed and goes on live', async () => {
  const first = track(await startServer());
  const a = client(first.url);
  const states = record(a, 'state');
  await a.connect();
  const ch = channelName('chat');
  const got = [];
  await a.subscribe(ch, (m) => got.push(m));
  const failedAtSub = once(a.subscription(ch), 'recovery-failed', () => true, 20_000);
  failedAtSub.catch(() => {}); // awaited below; do not report it twice if the test fails earlier
  const b = client(first.url);
  await b.connect();
  await b.publish(ch, 'before');
  await until(() => got.length === 1);
  const oldId = a.clientId;
  const oldEpoch = a.subscription(ch).epoch;

  const away = once(a, 'state', (s) => s === 'reconnecting', 5000);
  await first.kill(); // SIGKILL: a crash, no close frame
  await away;
  const back = once(a, 'state', (s) => s === 'open', 20_000);
  const second = await restartOnSamePort(first.port);
  await back;
  assert.notEqual(a.clientId, oldId, 'a new connection, a new id');

  const failed = await failedAtSub;
  // A restarted in-memory server starts a new stream: nothing to recover.
  assert.equal(failed.channel, ch);
  assert.deepEqual(failed.previous, { epoch: oldEpoch, offset: 1 });
  assert.notEqual(failed.epoch, oldEpoch);
  assert.equal(failed.frame.recovered, false);

  await until(() => b.state === 'open', 20_000, 'b back');
  await b.publish(ch, 'after');
  await until(() => got.length === 2, 5000, 'the live message');
  assert.deepEqual(got.map((m) => m.data), ['before', 'after']);
  assert.ok(states.includes('reconnecting'));
  void second;
});

test('a graceful stop (SIGTERM, drain) is followed by a reconnect to the restarted server', async () => {
  const first = track(await startServer());
  const a = client(first.url);
  await a.connect();
  const closes = [];
  a.on('state', (s, info) => {
    if (s === 'reconnecting' && info.code !== undefined) closes.push(info);
  });
  const away = once(a, 'state', (s) => s === 'reconnecting', 15_000);
  const stopped = first.stop();
  await away;
  await stopped;
  const back = once(a, 'state', (s) => s === 'open', 40_000);
  await restartOnSamePort(first.port);
  await back;
  assert.equal((await a.ping()).type, 'pong');
  // The server says why it closed: 1001 (going away) or 1012 (restart, maybe with retry=MS).
  assert.ok(closes.length >= 1);
  assert.ok([1001, 1012, 1006].includes(closes[0].code), `close code ${closes[0].code}`);
});

test('queued sends made while the server is down are flushed after it comes back', async () => {
  const first = track(await startServer());
  // A slow, deterministic reconnect, so that b is back before a flushes.
  const a = client(first.url, { reconnectBaseDelay: 1500, random: () => 0.99 });
  await a.connect();
  const ch = channelName();
  const away = once(a, 'state', (s) => s === 'reconnecting', 5000);
  await first.kill();
  await away;
  const p = a.publish(ch, 'queued');
  assert.equal(a.send('broadcast', 'queued broadcast'), true);
  const second = await restartOnSamePort(first.port);
  const b = client(second.url);
  await b.connect();
  const bc = once(b, 'broadcast', (m) => m.data === 'queued broadcast', 20_000);
  const ack = await p;
  assert.equal(ack.channel, ch);
  assert.equal(ack.offset, 1);
  await bc;
});

test('a frozen server is detected by the heartbeat; requests time out; the client reconnects when it thaws', async () => {
  const server = track(await startServer());
  const a = client(server.url, { heartbeatTimeout: 400, heartbeatPongTimeout: 300 });
  await a.connect();
  const away = once(a, 'state', (s) => s === 'reconnecting', 5000);
  await server.pause(); // SIGSTOP: the TCP connection stays up, nothing answers
  await assert.rejects(a.ping({ timeout: 200 }), { code: 'timeout' });
  const info = await away;
  assert.equal(info[1].code, 4000);
  assert.match(info[1].reason, /heartbeat/);
  const back = once(a, 'state', (s) => s === 'open', 20_000);
  server.resume();
  await back;
  assert.equal((await a.ping()).type, 'pong');
});

test('maxReconnectAttempts makes the client give up', async () => {
  const server = track(await startServer());
  const a = client(server.url, { maxReconnectAttempts: 2, reconnectBaseDelay: 10, reconnectMaxDelay: 20 });
  await a.connect();
  const gaveUp = once(a, 'state', (s, info) => s === 'closed' && info.gaveUp === true, 10_000);
  await server.kill();
  await gaveUp;
  assert.equal(a.reconnectAttempts, 2);
  await assert.rejects(a.ping(), { code: 'closed' });
  assert.equal(a.send('broadcast', 1), false);
});
