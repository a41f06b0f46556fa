// Acknowledged at-least-once delivery with the real server: the client
// acknowledges what the app was handed, survives a forced disconnect
// mid-stream, and never hands the app a publication twice.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { sleep, until } from './helpers.mjs';

let server;
const clients = [];
const FAST = { reconnectBaseDelay: 50, reconnectMaxDelay: 300 };

before(async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'sb-acked-'));
  const config = path.join(dir, 'switchboard.toml');
  writeFileSync(
    config,
    ['ack_timeout = "300ms"', 'rate_limit = 0.0', '[namespaces.orders]', 'acked = true', 'history_size = 1000', ''].join('\n'),
  );
  server = await startServer({ args: ['--config', config, '--ping-interval', '1s', '--pong-timeout', '1s'] });
});

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

async function connected() {
  const c = new RealtimeClient(server.url, FAST);
  clients.push(c);
  await c.connect();
  return c;
}

async function metrics() {
  const res = await fetch(server.url.replace('ws://', 'http://').replace(/\/ws$/, '/metrics'));
  return res.json();
}

test('acknowledged delivery survives a forced disconnect mid-stream: nothing lost, nothing twice', async () => {
  const TOTAL = 300;
  const channel = `orders:${Date.now()}`;
  const consumer = await connected();
  const publisher = await connected();
  const seen = [];
  const subscribed = await consumer.subscribe(channel, (m) => seen.push(m.data));
  assert.equal(subscribed.acked, true);
  assert.equal(consumer.subscriptions.get(channel).acked, true);

  const publishing = (async () => {
    for (let i = 1; i <= TOTAL; i++) {
      await publisher.publish(channel, i);
      if (i % 25 === 0) await sleep(5);
    }
  })();
  await until(() => seen.length >= TOTAL / 3, 10000);
  consumer._dropConnection('test: forced disconnect mid-stream');
  await publishing;
  await until(() => seen.length >= TOTAL, 15000);
  assert.deepEqual(seen, Array.from({ length: TOTAL }, (_, i) => i + 1));

  // Everything was acknowledged: the server stops resending.
  await sleep(500);
  const before = (await metrics()).redeliveries;
  await sleep(1000);
  assert.equal((await metrics()).redeliveries, before, 'no redelivery once all is acknowledged');
  assert.equal(seen.length, TOTAL, 'still exactly once each');
});
