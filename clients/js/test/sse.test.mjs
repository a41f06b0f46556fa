// The SSE transport from the client's side, against real servers: the same
// API over SSE alone; the fallback when a proxy refuses the WebSocket
// upgrade, with two instances on Redis behind a proxy that has no affinity
// (each request goes to the next instance); back to WebSocket on a later
// reconnect; a server restart with the missed messages recovered.
// Needs Redis on 127.0.0.1:6379 for the two-instance and restart cases.

import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient, sseUrlFor } from '../switchboard.js';
import { startServer } from './server.mjs';
import { startProxy } from './proxy.mjs';
import { channelName, once, until } from './helpers.mjs';

const FAST = { reconnectBaseDelay: 50, reconnectMaxDelay: 300 };
const REDIS = 'redis://127.0.0.1:6379';
const cleanup = [];

afterEach(async () => {
  while (cleanup.length) await cleanup.pop()();
});

function client(url, opts = {}) {
  const c = new RealtimeClient(url, { ...FAST, ...opts });
  cleanup.push(async () => c.close());
  return c;
}

async function server(opts) {
  const s = await startServer(opts);
  cleanup.push(() => s.stop(3000));
  return s;
}

function redisArgs(prefix) {
  return ['--bus', REDIS, '--bus-prefix', prefix];
}

const prefix = () => `sbjs-sse-${process.pid}-${Date.now().toString(36)}-${Math.floor(Math.random() * 1e6)}`;

test('sseUrlFor maps the WebSocket URL to the stream', () => {
  assert.equal(sseUrlFor('ws://h:1/ws?token=t'), 'http://h:1/sse?token=t');
  assert.equal(sseUrlFor('wss://h/app/ws'), 'https://h/app/sse');
  assert.equal(sseUrlFor('ws://h:1'), 'http://h:1/sse');
  assert.throws(() => new RealtimeClient('ws://h/ws', { transports: ['carrier-pigeon'] }), TypeError);
});

test('over SSE alone the application sees the same API', async () => {
  const s = await server();
  const a = client(s.url, { transports: ['sse'] });
  const welcome = await a.connect();
  assert.equal(a.transport, 'sse');
  assert.match(welcome.session, /^client-.+\..{32,}$/);
  const ch = channelName('chat');
  const got = [];
  await a.subscribe(ch, (m) => got.push(m.data));
  const ack = await a.publish(ch, { n: 1 });
  assert.equal(ack.type, 'ack');
  const b = client(s.url, { transports: ['websocket'] });
  await b.connect();
  assert.equal(b.transport, 'websocket');
  await b.publish(ch, { n: 2 });
  await until(() => got.length === 2, 5000, 'both messages');
  assert.deepEqual(got, [{ n: 1 }, { n: 2 }]);
  const direct = once(a, 'direct');
  await b.direct(a.clientId, 'psst');
  assert.equal((await direct).data, 'psst');
  const presence = await a.presence(ch).catch((e) => e);
  assert.ok(presence.type === 'presence' || presence.code === 'presence_disabled');
  const history = await a.history(ch, { limit: 10 });
  assert.deepEqual(history.publications.map((p) => p.data), [{ n: 1 }, { n: 2 }]);
  await assert.rejects(a.subscribe('bad channel!'), (e) => e.code === 'bad_channel');
  assert.equal((await a.ping()).type, 'pong');
});

test('behind a proxy that refuses WebSocket and has no affinity, the client falls back to SSE across two instances', async () => {
  const p = prefix();
  const one = await server({ args: redisArgs(p) });
  const two = await server({ args: redisArgs(p) });
  const proxy = await startProxy([one.port, two.port]);
  cleanup.push(() => proxy.close());

  const a = client(proxy.url);
  const states = [];
  a.on('state', (st, info) => states.push([st, info.transport]));
  await a.connect();
  assert.equal(a.transport, 'sse');
  assert.ok(proxy.upgradesRefused >= 1, 'the WebSocket upgrade was tried first');

  const ch = channelName('chat');
  const got = [];
  await a.subscribe(ch, (m) => got.push(m.data));
  for (let n = 1; n <= 6; n++) await a.publish(ch, n);
  // A WebSocket client straight on each instance reaches the stream too.
  for (const s of [one, two]) {
    const w = client(s.url, { transports: ['websocket'] });
    await w.connect();
    await w.publish(ch, `from ${s.port}`);
  }
  await until(() => got.length === 8, 10_000, 'every message');
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6, `from ${one.port}`, `from ${two.port}`]);
  const posts = proxy.requests.filter((r) => r.method === 'POST');
  const upstreams = new Set(posts.map((r) => r.upstream));
  assert.equal(upstreams.size, 2, `POSTs went to both instances: ${JSON.stringify(posts)}`);
});

test('a client on SSE goes back to WebSocket on a later reconnect', async () => {
  const s = await server();
  // First through a proxy that refuses the upgrade…
  const proxy = await startProxy([s.port]);
  cleanup.push(() => proxy.close());
  const url = proxy.url;
  const a = client(url);
  await a.connect();
  assert.equal(a.transport, 'sse');
  // …then the way is clear: the next connection is a WebSocket again.
  const ch = channelName('chat');
  const got = [];
  await a.subscribe(ch, (m) => got.push(m.data));
  await a.publish(ch, 'before');
  a.url = s.url;
  a.options.sseUrl = undefined;
  const back = once(a, 'state', (st) => st === 'open', 10_000);
  a._dropConnection('test: network change');
  await back;
  assert.equal(a.transport, 'websocket');
  await a.publish(ch, 'after');
  await until(() => got.length === 2, 5000, 'both messages once');
  assert.deepEqual(got, ['before', 'after']);
});

test('over SSE, a server restart loses nothing: the missed messages are recovered once, in order', async () => {
  const p = prefix();
  const first = await server({ args: redisArgs(p) });
  const other = await server({ args: redisArgs(p) });
  const a = client(first.url, { transports: ['sse'] });
  await a.connect();
  const ch = channelName('chat');
  const got = [];
  await a.subscribe(ch, (m) => got.push(m.data));
  const pub = client(other.url, { transports: ['websocket'] });
  await pub.connect();
  await pub.publish(ch, 0);
  await until(() => got.length === 1, 5000, 'the first message');

  const away = once(a, 'state', (st) => st === 'reconnecting', 5000);
  await first.kill();
  await away;
  for (let n = 1; n <= 5; n++) await pub.publish(ch, n); // missed by `a`
  const back = once(a, 'state', (st) => st === 'open', 20_000);
  let again;
  for (let i = 0; i < 20 && !again; i++) {
    again = await startServer({ port: first.port, args: redisArgs(p) }).catch(() => null);
    if (!again) await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(again, 'the server restarts on its port');
  cleanup.push(() => again.stop(3000));
  await back;
  assert.equal(a.transport, 'sse');
  await pub.publish(ch, 6);
  await until(() => got.length === 7, 10_000, 'every message');
  assert.deepEqual(got, [0, 1, 2, 3, 4, 5, 6]);
});
