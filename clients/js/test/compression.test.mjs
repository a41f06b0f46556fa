// permessage-deflate (RFC 7692) with real clients against the real server
// started with `--compression true`:
// - Node's built-in WebSocket (undici; it offers
//   `permessage-deflate; client_max_window_bits`, like browsers);
// - the Switchboard client (switchboard.js) over such a connection;
// - Chromium (skipped, like the other browser tests, when it is missing).
//
// A tapping TCP proxy between client and server parses the server's frames
// so the tests also see that large messages really went out compressed
// (RSV1 set) and small ones did not.
// Run: node --experimental-websocket --test clients/js/test/

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { channelName, once } from './helpers.mjs';
import { ARGS, CHROMIUM, chromium, skipReason } from './browser-env.mjs';

const WAIT = 5000;

let server;
const sockets = [];
const clients = [];
const proxies = [];

before(async () => {
  server = await startServer({ args: ['--compression', 'true'] });
});

after(async () => {
  for (const ws of sockets) ws.close();
  for (const c of clients) c.close();
  for (const p of proxies) p.close();
  await server?.stop();
});

/** A repetitive (compressible) payload of about `n` bytes of JSON. */
function bigData(n) {
  const items = [];
  for (let i = 0; JSON.stringify(items).length < n; i++) {
    items.push({ id: i, name: `widget-${i % 7}`, state: 'ok', tags: ['a', 'b'] });
  }
  return { items };
}

/**
 * A TCP proxy to the server that records the header of every frame the
 * server sends: `{ conn, rsv1, opcode, length }` (`conn` numbers the proxied
 * connections from 0). Bytes pass through unchanged; a frame is recorded
 * before the client can have processed it.
 */
function tapProxy() {
  const frames = [];
  let conns = 0;
  const srv = net.createServer((client) => {
    const conn = conns++;
    const upstream = net.connect(server.port, '127.0.0.1');
    client.pipe(upstream);
    let buf = Buffer.alloc(0);
    let headDone = false;
    upstream.on('data', (chunk) => {
      client.write(chunk);
      buf = Buffer.concat([buf, chunk]);
      if (!headDone) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        buf = buf.subarray(end + 4);
        headDone = true;
      }
      for (;;) {
        if (buf.length < 2) return;
        let length = buf[1] & 0x7f;
        let header = 2;
        if (length === 126) {
          if (buf.length < 4) return;
          length = buf.readUInt16BE(2);
          header = 4;
        } else if (length === 127) {
          if (buf.length < 10) return;
          length = Number(buf.readBigUInt64BE(2));
          header = 10;
        }
        if (buf.length < header + length) return;
        frames.push({ conn, rsv1: (buf[0] & 0x40) !== 0, opcode: buf[0] & 0x0f, length });
        buf = buf.subarray(header + length);
      }
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  const open = new Set();
  srv.on('connection', (s) => {
    open.add(s);
    s.on('close', () => open.delete(s));
  });
  const ready = new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const proxy = {
    frames,
    ready,
    get url() {
      return `ws://127.0.0.1:${srv.address().port}/ws`;
    },
    close() {
      for (const s of open) s.destroy();
      srv.close();
    },
  };
  proxies.push(proxy);
  return proxy;
}

/** Open a built-in WebSocket; resolve with it and its first (welcome) frame. */
function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    sockets.push(ws);
    const inbox = [];
    const waiters = [];
    ws.addEventListener('message', (ev) => {
      const frame = JSON.parse(ev.data);
      const w = waiters.findIndex((x) => x.pred(frame));
      if (w >= 0) waiters.splice(w, 1)[0].resolve(frame);
      else inbox.push(frame);
    });
    /** The next frame for which `pred` holds (frames already received first). */
    ws.next = (pred, timeout = WAIT) => {
      const i = inbox.findIndex(pred);
      if (i >= 0) return Promise.resolve(inbox.splice(i, 1)[0]);
      return new Promise((res, rej) => {
        const waiter = { pred, resolve: res };
        waiters.push(waiter);
        setTimeout(() => {
          const at = waiters.indexOf(waiter);
          if (at >= 0) {
            waiters.splice(at, 1);
            rej(new Error(`timed out after ${timeout} ms waiting for a frame`));
          }
        }, timeout);
      });
    };
    ws.sendJson = (v) => ws.send(JSON.stringify(v));
    const timer = setTimeout(() => reject(new Error('no open within 5 s')), WAIT);
    ws.addEventListener('error', (ev) => {
      clearTimeout(timer);
      reject(new Error(`WebSocket error: ${ev.message ?? ev.type}`));
    });
    ws.addEventListener('open', async () => {
      clearTimeout(timer);
      try {
        const welcome = await ws.next((f) => f.type === 'connected');
        resolve({ ws, welcome });
      } catch (err) {
        reject(err);
      }
    });
  });
}

async function subscribed(ws, channel, id) {
  ws.sendJson({ type: 'subscribe', channel, id });
  const reply = await ws.next((f) => f.ref === id);
  assert.equal(reply.type, 'subscribed', JSON.stringify(reply));
}

describe("Node's built-in WebSocket", () => {
  test('negotiates permessage-deflate', async () => {
    const { ws, welcome } = await open(server.url);
    assert.match(ws.extensions, /^permessage-deflate\b/, `extensions: ${JSON.stringify(ws.extensions)}`);
    assert.match(ws.extensions, /server_no_context_takeover/);
    assert.match(ws.extensions, /client_no_context_takeover/);
    assert.equal(welcome.type, 'connected');
    ws.sendJson({ type: 'ping', id: 1 });
    assert.deepEqual(await ws.next((f) => f.ref === 1), { type: 'pong', ref: 1 });
  });

  test('two subscribers receive a 10 KB publication intact, compressed on the wire', async () => {
    const tap = tapProxy();
    await tap.ready;
    const { ws: a } = await open(tap.url);
    const { ws: b } = await open(tap.url);
    const { ws: publisher } = await open(server.url);
    const channel = channelName('deflate');
    await subscribed(a, channel, 1);
    await subscribed(b, channel, 1);
    const data = bigData(10 * 1024);
    const size = JSON.stringify(data).length;
    assert.ok(size >= 10 * 1024 && size < 11 * 1024, `${size} bytes`);
    publisher.sendJson({ type: 'publish', channel, data, id: 2 });
    const ack = await publisher.next((f) => f.ref === 2);
    assert.equal(ack.type, 'ack', JSON.stringify(ack));

    const [ma, mb] = await Promise.all([
      a.next((f) => f.type === 'message'),
      b.next((f) => f.type === 'message'),
    ]);
    for (const m of [ma, mb]) {
      assert.equal(m.channel, channel);
      assert.equal(m.offset, ack.offset);
      assert.deepEqual(m.data, data);
    }
    // On the wire: the last text frame each got (the publication) was
    // compressed, to much less than 10 KB, the same size for both (shared);
    // the short `subscribed` replies before it went out plain.
    const texts = (conn) => tap.frames.filter((f) => f.conn === conn && f.opcode === 1);
    const [fa, fb] = [texts(0).at(-1), texts(1).at(-1)];
    for (const f of [fa, fb]) {
      assert.equal(f.rsv1, true, `the publication went out uncompressed: ${JSON.stringify(tap.frames)}`);
      assert.ok(f.length < size / 4, `${f.length} compressed bytes for ${size}`);
    }
    assert.equal(fa.length, fb.length, 'both copies are the same shared bytes');
    assert.ok(
      tap.frames.some((f) => f.opcode === 1 && !f.rsv1 && f.length < 128),
      `no short reply went out plain: ${JSON.stringify(tap.frames)}`,
    );
  });

  test('large client messages (sent uncompressed by Node) are accepted', async () => {
    const { ws } = await open(server.url);
    const channel = channelName('deflate');
    await subscribed(ws, channel, 1);
    const data = bigData(30 * 1024);
    ws.sendJson({ type: 'publish', channel, data, id: 3 });
    const m = await ws.next((f) => f.type === 'message');
    assert.deepEqual(m.data, data);
  });
});

describe('the Switchboard client over a compressing connection', () => {
  test('connect, subscribe, publish 10 KB, receive it intact', async () => {
    const tap = tapProxy();
    await tap.ready;
    const opts = { reconnectBaseDelay: 50, reconnectMaxDelay: 300 };
    const sub = new RealtimeClient(tap.url, opts);
    const pub = new RealtimeClient(server.url, opts);
    clients.push(sub, pub);
    await sub.connect();
    await pub.connect();
    assert.match(sub.ws.extensions, /^permessage-deflate\b/, `extensions: ${JSON.stringify(sub.ws.extensions)}`);

    const channel = channelName('deflate');
    const received = [];
    await sub.subscribe(channel, (msg) => received.push(msg));
    const data = bigData(10 * 1024);
    const ack = await pub.publish(channel, data);
    assert.equal(ack.type, 'ack');
    const deadline = Date.now() + WAIT;
    while (received.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(received.length, 1, 'the publication arrives within 5 s');
    assert.equal(received[0].offset, ack.offset);
    assert.deepEqual(received[0].data, data);
    assert.ok(
      tap.frames.some((f) => f.opcode === 1 && f.rsv1),
      `no compressed frame reached the client: ${JSON.stringify(tap.frames)}`,
    );

    const pong = await sub.ping();
    assert.equal(pong.type, 'pong');
    assert.equal(sub.state, 'open');
  });

  test('a reconnect negotiates compression again', async () => {
    const c = new RealtimeClient(server.url, { reconnectBaseDelay: 50, reconnectMaxDelay: 300 });
    clients.push(c);
    await c.connect();
    const first = c.ws;
    assert.match(first.extensions, /^permessage-deflate\b/);
    const reopened = once(c, 'state', (s) => s === 'open', WAIT);
    first.close(4000, 'test: drop');
    await reopened;
    assert.notEqual(c.ws, first);
    assert.match(c.ws.extensions, /^permessage-deflate\b/);
  });
});

test('Chromium negotiates permessage-deflate and a large message round-trips', { skip: skipReason || false, timeout: 60_000 }, async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
  try {
    const page = await browser.newPage();
    const res = await page.goto(`${server.httpUrl}/_ah/health`);
    assert.equal(res.status(), 200);
    const result = await page.evaluate(
      ({ url, channel }) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          const timer = setTimeout(() => reject(new Error('timed out in the page')), 10_000);
          const items = [];
          for (let i = 0; i < 200; i++) items.push({ id: i, name: `widget-${i % 7}`, state: 'ok' });
          const data = { items };
          ws.onerror = () => reject(new Error('WebSocket error in the page'));
          ws.onmessage = (ev) => {
            const f = JSON.parse(ev.data);
            if (f.type === 'connected') ws.send(JSON.stringify({ type: 'subscribe', channel, id: 1 }));
            else if (f.type === 'subscribed') ws.send(JSON.stringify({ type: 'publish', channel, data, id: 2 }));
            else if (f.type === 'message') {
              clearTimeout(timer);
              resolve({
                extensions: ws.extensions,
                intact: JSON.stringify(f.data) === JSON.stringify(data),
                size: JSON.stringify(data).length,
              });
              ws.close();
            }
          };
        }),
      { url: server.url, channel: channelName('deflate') },
    );
    assert.match(result.extensions, /^permessage-deflate\b/, JSON.stringify(result));
    assert.ok(result.size > 8000, JSON.stringify(result));
    assert.equal(result.intact, true);
  } finally {
    await browser.close();
  }
});
