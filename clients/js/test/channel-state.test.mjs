// Newest-first history, idempotent and conditional publish through the
// client (issue 19), against the real server binary.
// Run: node --experimental-websocket --test clients/js/test/channel-state.test.mjs

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient, SwitchboardError } from '../switchboard.js';
import { startServer } from './server.mjs';
import { channelName } from './helpers.mjs';

let server;
let client;

before(async () => {
  server = await startServer();
  client = new RealtimeClient(server.url);
  await client.connect();
});

after(async () => {
  client?.close();
  await server?.stop();
});

test('history({reverse}) returns the newest first', async () => {
  const ch = channelName('newest');
  for (let n = 1; n <= 5; n++) await client.publish(ch, { n });
  const h = await client.history(ch, { limit: 2, reverse: true });
  assert.deepEqual(h.publications.map((p) => p.offset), [5, 4]);
  assert.equal(h.publications[0].data.n, 5);
  const after3 = await client.history(ch, { since: { epoch: h.epoch, offset: 3 }, reverse: true });
  assert.deepEqual(after3.publications.map((p) => p.offset), [5, 4]);
  const oldest = await client.history(ch, { limit: 1 });
  assert.equal(oldest.publications[0].offset, 1);
});

test('publish({idempotencyKey}) publishes once and repeats the first ack', async () => {
  const ch = channelName('idem');
  const first = await client.publish(ch, 'a', { idempotencyKey: 'job-1' });
  const again = await client.publish(ch, 'b', { idempotencyKey: 'job-1' });
  assert.equal(again.offset, first.offset);
  const h = await client.history(ch);
  assert.deepEqual(h.publications.map((p) => p.data), ['a']);
  await assert.rejects(client.publish(ch, 'c', { idempotencyKey: '' }), (err) => {
    assert.ok(err instanceof SwitchboardError);
    assert.equal(err.code, 'invalid_idempotency_key');
    return true;
  });
});

test('publish({expectedOffset}) appends only at that offset', async () => {
  const ch = channelName('cas');
  const first = await client.publish(ch, 1, { expectedOffset: 0 });
  assert.equal(first.offset, 1);
  await assert.rejects(client.publish(ch, 2, { expectedOffset: 0 }), (err) => {
    assert.equal(err.code, 'offset_mismatch');
    assert.equal(err.frame.offset, 1);
    assert.equal(typeof err.frame.epoch, 'string');
    return true;
  });
  const second = await client.publish(ch, 2, { expectedOffset: 1 });
  assert.equal(second.offset, 2);
});

test('sys:metrics is a last-value channel: a new subscriber gets the latest figures first', async () => {
  const first = new RealtimeClient(server.url);
  const second = new RealtimeClient(server.url);
  try {
    await first.connect();
    const sample = new Promise((resolve) => first.subscribe('sys:metrics', resolve));
    await sample; // published once a second while someone listens
    await second.connect();
    const seen = [];
    const subscribed = await second.subscribe('sys:metrics', (m) => seen.push(m));
    assert.ok(seen.length >= 1, 'a message before subscribed resolved');
    assert.equal(seen[0].offset, subscribed.offset);
    assert.equal(typeof seen[0].data, 'object');
  } finally {
    first.close();
    second.close();
  }
});
