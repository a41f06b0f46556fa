// The client against a server with auth on: a refresh with narrower grants
// ends the subscriptions it no longer grants, and the client forgets them.
// Run: node --experimental-websocket --test clients/js/test/

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { once } from './helpers.mjs';

const SECRET = 'js-test-secret-0123456789';

/** An HS256 JWT for `claims`. */
function jwt(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

const token = (subscribe) =>
  jwt({ sub: 'js-user', exp: Math.floor(Date.now() / 1000) + 600, channels: { subscribe } });

let server;
let client;

before(async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'sb-js-auth-'));
  const secret = path.join(dir, 'secret');
  writeFileSync(secret, SECRET);
  // No anonymous use of the default namespace: every channel needs a grant.
  server = await startServer({ args: ['--auth-hs256-secret-file', secret, '--anonymous', 'false'] });
});

after(async () => {
  client?.close();
  await server?.stop();
});

test('a refresh with narrower grants ends the subscriptions it no longer grants', async () => {
  client = new RealtimeClient(`${server.url}?token=${token(['a', 'b'])}`, { reconnectBaseDelay: 50 });
  await client.connect();
  await Promise.all([client.subscribe('a'), client.subscribe('b')]);
  const [a, b] = [client.subscription('a'), client.subscription('b')];

  const ended = once(b, 'unsubscribed');
  client.send('auth', undefined, { token: token(['a']) });
  const frame = await ended;
  assert.equal(frame.channel, 'b');
  assert.equal(b.state, 'unsubscribed');
  assert.equal(client.subscriptions.has('b'), false);
  assert.equal(a.state, 'subscribed');
  assert.equal(client.subscriptions.has('a'), true);
});
