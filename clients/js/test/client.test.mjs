// Tests of clients/js/switchboard.js against the real server binary.
// Run: node --experimental-websocket --test clients/js/test/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient, SwitchboardError, parseRetryHint } from '../switchboard.js';
import { startServer } from './server.mjs';
import { channelName, once, record, sleep, until } from './helpers.mjs';

const FAST = { reconnectBaseDelay: 50, reconnectMaxDelay: 300 };

let server;
const clients = [];

function client(opts = {}) {
  const c = new RealtimeClient(server.url, { ...FAST, ...opts });
  clients.push(c);
  return c;
}

async function connected(opts) {
  const c = client(opts);
  await c.connect();
  return c;
}

before(async () => {
  server = await startServer();
});

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

describe('connection', () => {
  test('connect() resolves with the connected frame and sets clientId', async () => {
    const c = client();
    const states = record(c, 'state');
    const frame = await c.connect();
    assert.equal(frame.type, 'connected');
    assert.match(c.clientId, /^client-\d+-[a-z0-9]{9}$/);
    assert.equal(frame.clientId, c.clientId);
    assert.equal(typeof frame.instanceId, 'string');
    assert.equal(c.instanceId, frame.instanceId);
    assert.equal(c.state, 'open');
    assert.deepEqual(states, ['connecting', 'open']);
    c.close();
    assert.equal(c.state, 'closed');
    assert.equal(c.clientId, null);
  });

  test('ping() is answered by pong', async () => {
    const c = await connected();
    const pong = await c.ping();
    assert.equal(pong.type, 'pong');
  });

  test('two clients get different ids', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    assert.notEqual(a.clientId, b.clientId);
  });

  test('parseRetryHint reads retry=MS from a close reason', () => {
    assert.equal(parseRetryHint('draining; retry=1500'), 1500);
    assert.equal(parseRetryHint('retry=0'), 0);
    assert.equal(parseRetryHint('going away'), null);
    assert.equal(parseRetryHint(undefined), null);
  });

  test('backoff uses full jitter under the cap and honours the retry hint', () => {
    const c = new RealtimeClient('ws://127.0.0.1:1/ws', {
      reconnectBaseDelay: 500,
      reconnectMaxDelay: 30_000,
      random: () => 0.999999,
    });
    assert.ok(c._backoffDelay(0) <= 500);
    assert.ok(c._backoffDelay(3) <= 4000 && c._backoffDelay(3) >= 3990);
    assert.ok(c._backoffDelay(20) <= 30_000 && c._backoffDelay(20) > 29_000);
    const zero = new RealtimeClient('ws://127.0.0.1:1/ws', { random: () => 0 });
    assert.equal(zero._backoffDelay(5), 0);
    zero._retryHint = 2000;
    assert.equal(zero._backoffDelay(0), 2000, 'waits at least the hint');
    assert.equal(zero._backoffDelay(0), 0, 'a hint is used once');
  });
});

test('options.WebSocket is used; a 1012 close with retry=MS delays the reconnect by at least MS', async () => {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.({});
        this.onmessage?.({ data: JSON.stringify({ type: 'connected', clientId: `client-1-fake${sockets.length}xxxx` }) });
      }, 0);
    }
    send(data) {
      this.sent.push(data);
    }
    close() {
      this.readyState = 3;
    }
  }
  const c = new RealtimeClient('ws://fake.invalid/ws', { WebSocket: FakeWebSocket, reconnectBaseDelay: 100, random: () => 0.5 });
  clients.push(c);
  await c.connect();
  assert.equal(sockets.length, 1);
  assert.equal(c.clientId, 'client-1-fake1xxxx');
  const away = once(c, 'state', (s) => s === 'reconnecting');
  sockets[0].readyState = 3;
  sockets[0].onclose({ code: 1012, reason: 'draining; retry=2000' });
  const [, info] = await away;
  assert.equal(info.code, 1012);
  assert.equal(info.delay, 2050, 'the hint plus full jitter (0.5 of the 100 ms base)');
  c.close();
  assert.equal(sockets.length, 1, 'close() cancels the pending reconnect');
});

describe('tutorial messages', () => {
  test('broadcast reaches every other client, never the sender', async () => {
    const [a, b, c] = await Promise.all([connected(), connected(), connected()]);
    const atA = record(a, 'broadcast');
    const gotB = once(b, 'broadcast', (m) => m.data?.n === 1);
    const gotC = once(c, 'broadcast', (m) => m.data?.n === 1);
    // The tutorial's form: send(type, data), no id, no reply.
    assert.equal(a.send('broadcast', { n: 1 }), true);
    const [mb, mc] = await Promise.all([gotB, gotC]);
    assert.equal(mb.senderId, a.clientId);
    assert.deepEqual(mb.data, { n: 1 });
    assert.equal(typeof mb.timestamp, 'number');
    assert.equal(mc.senderId, a.clientId);
    // With an id the sender gets an ack, and still no copy.
    const got2 = once(b, 'broadcast', (m) => m.data?.n === 2);
    const ack = await a.broadcast({ n: 2 });
    assert.equal(ack.type, 'ack');
    await got2;
    await sleep(200);
    assert.deepEqual(atA, [], 'the sender receives nothing');
  });

  test('direct reaches only its target and is acknowledged', async () => {
    const [a, b, c] = await Promise.all([connected(), connected(), connected()]);
    const atC = record(c, 'direct');
    const got = once(b, 'direct');
    const ack = await a.direct(b.clientId, { hello: 'b' });
    assert.equal(ack.type, 'ack');
    const m = await got;
    assert.equal(m.senderId, a.clientId);
    assert.deepEqual(m.data, { hello: 'b' });
    await sleep(100);
    assert.deepEqual(atC, []);
  });

  test('direct to an unknown target rejects with unknown_target; the connection goes on', async () => {
    const a = await connected();
    const errors = record(a, 'error');
    await assert.rejects(a.direct('client-0-nobody0000', 'x'), (err) => {
      assert.ok(err instanceof SwitchboardError);
      assert.ok(err instanceof Error);
      assert.equal(err.code, 'unknown_target');
      assert.equal(typeof err.message, 'string');
      return true;
    });
    assert.equal(errors.length, 1, "on('error') listeners see the error frame too");
    assert.equal((await a.ping()).type, 'pong');
  });
});

describe('channels', () => {
  test('subscribe, publish, ack, message with offset', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const ch = channelName();
    const got = [];
    const sub = await a.subscribe(ch, (m) => got.push(m));
    assert.equal(sub.type, 'subscribed');
    assert.equal(sub.channel, ch);
    assert.equal(typeof sub.epoch, 'string');
    assert.equal(sub.offset, 0);
    const atB = record(b, 'message');
    const ack = await b.publish(ch, { text: 'hi' });
    assert.equal(ack.type, 'ack');
    assert.equal(ack.channel, ch);
    assert.equal(ack.offset, 1);
    await until(() => got.length === 1, 3000, 'the message');
    const m = got[0];
    assert.equal(m.type, 'message');
    assert.equal(m.channel, ch);
    assert.deepEqual(m.data, { text: 'hi' });
    assert.equal(m.senderId, b.clientId);
    assert.equal(m.offset, 1);
    assert.equal(m.epoch, sub.epoch);
    assert.equal(typeof m.timestamp, 'number');
    await sleep(100);
    assert.deepEqual(atB, [], 'a publisher that is not subscribed gets nothing');
    assert.deepEqual(a.subscription(ch).position, { epoch: sub.epoch, offset: 1 });
  });

  test('a subscribed publisher receives its own publication once', async () => {
    const a = await connected();
    const ch = channelName();
    const got = [];
    await a.subscribe(ch, (m) => got.push(m));
    const ack = await a.publish(ch, 'me');
    await until(() => got.length === 1);
    assert.equal(got[0].offset, ack.offset);
    await sleep(100);
    assert.equal(got.length, 1);
  });

  test('subscribing twice shares one subscription; both handlers run', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const ch = channelName();
    const one = [];
    const two = [];
    const f1 = await a.subscribe(ch, (m) => one.push(m));
    const f2 = await a.subscribe(ch, (m) => two.push(m));
    assert.equal(f1.epoch, f2.epoch);
    await b.publish(ch, 1);
    await until(() => one.length === 1 && two.length === 1);
  });

  test('a refused subscribe rejects with the server code and is forgotten', async () => {
    const a = await connected();
    await assert.rejects(a.subscribe('bad channel!'), { code: 'bad_channel' });
    assert.equal(a.subscription('bad channel!'), undefined);
  });

  test('publish errors reject with .code', async () => {
    const a = await connected();
    await assert.rejects(a.publish('', 1), { code: 'bad_channel' });
  });

  test('unsubscribe stops delivery', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const ch = channelName();
    const got = [];
    await a.subscribe(ch, (m) => got.push(m));
    await b.publish(ch, 1);
    await until(() => got.length === 1);
    const frame = await a.unsubscribe(ch);
    assert.equal(frame.type, 'unsubscribed');
    assert.equal(a.subscription(ch), undefined);
    await b.publish(ch, 2);
    await sleep(200);
    assert.equal(got.length, 1);
    assert.equal(await a.unsubscribe(ch), null, 'unsubscribing again is harmless');
  });

  test('presence lists members; join and leave reach the other subscribers', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const ch = channelName('chat');
    await a.subscribe(ch);
    const joinAtSub = once(a.subscription(ch), 'join');
    const joinAtClient = once(a, 'join', (m) => m.channel === ch);
    await b.subscribe(ch);
    const j = await joinAtClient;
    assert.equal(j.clientId, b.clientId);
    assert.equal(j.userId, null);
    assert.equal((await joinAtSub).clientId, b.clientId);
    const p = await a.presence(ch);
    assert.equal(p.type, 'presence');
    assert.equal(p.count, 2);
    assert.deepEqual(p.members.map((m) => m.clientId).sort(), [a.clientId, b.clientId].sort());
    const leave = once(a, 'leave', (m) => m.channel === ch);
    await b.unsubscribe(ch);
    assert.equal((await leave).clientId, b.clientId);
    const leave2 = once(a, 'leave', (m) => m.channel === ch);
    const c = await connected();
    await c.subscribe(ch);
    const cId = c.clientId;
    c.close();
    assert.equal((await leave2).clientId, cId, 'a disconnect is a leave');
  });

  test('history returns publications oldest first, with since and limit', async () => {
    const a = await connected();
    const ch = channelName();
    for (let i = 1; i <= 5; i++) await a.publish(ch, { i });
    const all = await a.history(ch);
    assert.equal(all.type, 'history');
    assert.deepEqual(all.publications.map((p) => p.offset), [1, 2, 3, 4, 5]);
    assert.deepEqual(all.publications.map((p) => p.data.i), [1, 2, 3, 4, 5]);
    assert.equal(all.offset, 5);
    const some = await a.history(ch, { since: { epoch: all.epoch, offset: 2 }, limit: 2 });
    assert.deepEqual(some.publications.map((p) => p.offset), [3, 4]);
    const stale = await a.history(ch, { since: { epoch: 'not-the-epoch', offset: 2 } });
    assert.deepEqual(stale.publications, []);
    assert.equal(stale.epoch, all.epoch);
  });

  test('off() removes a handler', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const got = [];
    const h = (m) => got.push(m);
    b.on('broadcast', h);
    await a.broadcast(1);
    await until(() => got.length === 1);
    b.off('broadcast', h);
    await a.broadcast(2);
    await sleep(150);
    assert.equal(got.length, 1);
  });
});

describe('disconnected behaviour', () => {
  test('requests made before connecting are queued, flushed on open; beyond the bound they reject', async () => {
    const ch = channelName();
    const a = client({ queueWhileDisconnected: 2 });
    const p1 = a.publish(ch, 1);
    const p2 = a.publish(ch, 2);
    await assert.rejects(a.publish(ch, 3), { code: 'queue_full' });
    assert.equal(a.send('broadcast', 'x'), false, 'send() returns false when the queue is full');
    await a.connect();
    const [k1, k2] = await Promise.all([p1, p2]);
    assert.deepEqual([k1.offset, k2.offset], [1, 2]);
  });

  test('an in-flight request is rejected when the connection drops', async () => {
    const a = await connected();
    const p = a.ping();
    a._dropConnection('test');
    await assert.rejects(p, { code: 'disconnected' });
    await once(a, 'state', (s) => s === 'open');
    assert.equal((await a.ping()).type, 'pong');
  });

  test('close() rejects queued requests and stops reconnecting', async () => {
    const a = await connected();
    a.close();
    await assert.rejects(a.ping(), { code: 'closed' });
    await sleep(200);
    assert.equal(a.state, 'closed');
    assert.equal(a.ws, null);
  });

  test('connect() after close() resumes subscriptions', async () => {
    const [a, b] = await Promise.all([connected(), connected()]);
    const ch = channelName();
    const got = [];
    await a.subscribe(ch, (m) => got.push(m.data));
    await b.publish(ch, 1);
    await until(() => got.length === 1);
    a.close();
    await b.publish(ch, 2);
    await a.connect();
    await b.publish(ch, 3);
    await until(() => got.length === 3, 5000, 'three messages');
    assert.deepEqual(got, [1, 2, 3]);
  });
});

describe('recovery', () => {
  test('a dropped socket recovers every missed publication once, in order', async () => {
    const ch = channelName('rec');
    // A slow, deterministic reconnect so that the publications below
    // certainly happen while the client is away.
    const a = await connected({ reconnectBaseDelay: 800, random: () => 0.99 });
    const b = await connected();
    const got = [];
    await a.subscribe(ch, (m) => got.push(m));
    const subscribedFrames = record(a.subscription(ch), 'subscribed');
    const failed = record(a, 'recovery-failed');
    await b.publish(ch, 1);
    await until(() => got.length === 1);

    const away = once(a, 'state', (s) => s === 'reconnecting');
    a.ws.close(); // the socket goes away under the client's feet
    await away;
    for (let i = 2; i <= 6; i++) await b.publish(ch, i);
    await once(a, 'state', (s) => s === 'open', 10_000);
    for (let i = 7; i <= 9; i++) await b.publish(ch, i);
    await until(() => got.length >= 9, 5000, 'nine messages');
    await sleep(200);
    assert.deepEqual(got.map((m) => m.data), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(got.map((m) => m.offset), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.equal(subscribedFrames.length, 1, 'one resubscribe');
    assert.equal(subscribedFrames[0].recovered, true);
    assert.deepEqual(failed, []);
  });

  test('recovery while publishing goes on: contiguous, no duplicates', async () => {
    const ch = channelName('rec');
    const a = await connected();
    const b = await connected();
    const got = [];
    await a.subscribe(ch, (m) => got.push(m.offset));
    let stop = false;
    let published = 0;
    const publisher = (async () => {
      while (!stop) {
        await b.publish(ch, ++published);
        await sleep(2);
      }
    })();
    for (let round = 0; round < 5; round++) {
      await sleep(60);
      a._dropConnection('test');
      await once(a, 'state', (s) => s === 'open', 10_000);
    }
    await sleep(60);
    stop = true;
    await publisher;
    await until(() => got.length >= published, 5000, 'every publication');
    await sleep(100);
    assert.equal(got.length, published, 'nothing twice, nothing missing');
    assert.deepEqual(got, Array.from({ length: published }, (_, i) => i + 1));
  });

  test('a duplicate or stale message is never handed to the app', async () => {
    const a = await connected();
    const b = await connected();
    const ch = channelName();
    const got = [];
    const all = record(a, 'message');
    await a.subscribe(ch, (m) => got.push(m.offset));
    await b.publish(ch, 1);
    await b.publish(ch, 2);
    await until(() => got.length === 2);
    const epoch = a.subscription(ch).epoch;
    // Replay frames as if the server had sent them again.
    const inject = (frame) => a._onMessage(a.ws, { data: JSON.stringify(frame) });
    inject({ type: 'message', channel: ch, data: 1, offset: 1, epoch, senderId: null, timestamp: 0 });
    inject({ type: 'message', channel: ch, data: 2, offset: 2, epoch, senderId: null, timestamp: 0 });
    await b.publish(ch, 3);
    await until(() => got.length === 3);
    assert.deepEqual(got, [1, 2, 3]);
    assert.equal(all.length, 3, "on('message') listeners see no duplicates either");
  });

  test('subscribe with an explicit since replays what was missed', async () => {
    const a = await connected();
    const ch = channelName();
    const first = await a.publish(ch, 'one');
    await a.publish(ch, 'two');
    await a.publish(ch, 'three');
    const hist = await a.history(ch);
    const b = await connected();
    const got = [];
    const frame = await b.subscribe(ch, (m) => got.push(m.data), {
      since: { epoch: hist.epoch, offset: first.offset },
    });
    assert.equal(frame.recovered, true);
    assert.deepEqual(got, ['two', 'three']);
  });

  test('an unknown epoch answers recovered:false and emits recovery-failed', async () => {
    const a = await connected();
    const ch = channelName();
    await a.publish(ch, 'x');
    const b = await connected();
    const got = [];
    const failedP = once(b, 'recovery-failed');
    const frame = await b.subscribe(ch, (m) => got.push(m), { since: { epoch: 'gone', offset: 0 } });
    assert.equal(frame.recovered, false);
    const info = await failedP;
    assert.equal(info.channel, ch);
    assert.deepEqual(info.previous, { epoch: 'gone', offset: 0 });
    assert.equal(info.epoch, frame.epoch);
    assert.equal(info.offset, 1);
    assert.deepEqual(got, [], 'nothing partial is delivered');
    await a.publish(ch, 'y');
    await until(() => got.length === 1);
    assert.equal(got[0].offset, 2);
  });
});
