// A live message from another epoch (the channel's stream was replaced:
// here evicted by the history budget, as a bus that lost its data would
// replace it) is treated as a gap: the client renews the subscription from
// its position and tells the app `recovery-failed`, never adopting the new
// stream silently.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { until } from './helpers.mjs';

let server;
const clients = [];

before(async () => {
  // One channel of history at most: a publication in another channel
  // evicts the first one's stream.
  server = await startServer({ args: ['--history-max-channels', '1'] });
});

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

async function connected() {
  const c = new RealtimeClient(server.url, { reconnectBaseDelay: 50, reconnectMaxDelay: 300 });
  clients.push(c);
  await c.connect();
  return c;
}

test('a live message of a new epoch is a gap: renewed subscription, recovery-failed, nothing adopted silently', async () => {
  const channel = `ep:${Date.now()}`;
  const other = `${channel}-other`;
  const reader = await connected();
  const writer = await connected();
  const seen = [];
  const failures = [];
  await reader.subscribe(channel, (m) => seen.push(m));
  const sub = reader.subscriptions.get(channel);
  sub.on('recovery-failed', (info) => failures.push(info));
  const first = await writer.publish(channel, 'old-1');
  await until(() => seen.length === 1);
  const oldEpoch = sub.epoch;
  assert.equal(seen[0].epoch, oldEpoch);

  await writer.publish(other, 'evicts the first stream');
  const renewed = await writer.publish(channel, 'new-1');
  assert.equal(renewed.offset, 1, 'the evicted channel starts a new stream');
  await until(() => failures.length === 1);
  const [info] = failures;
  assert.deepEqual(info.previous, { epoch: oldEpoch, offset: first.offset });
  assert.notEqual(info.epoch, oldEpoch, 'the position moved to the new stream');
  assert.equal(sub.epoch, info.epoch);
  assert.equal(sub.state, 'subscribed');
  assert.ok(
    seen.every((m) => m.epoch === oldEpoch),
    'no message of the new stream was handed over as if nothing had happened',
  );

  // Live again, in the new epoch.
  await writer.publish(channel, 'new-2');
  await until(() => seen.some((m) => m.data === 'new-2'));
  assert.equal(seen.at(-1).epoch, info.epoch);
});
