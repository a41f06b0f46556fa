// The tutorial's own RealtimeClient, unchanged, against Switchboard: the
// compatibility promise of docs/protocol.md.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient as TutorialClient } from './tutorial-client.js';
import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { once, sleep, until } from './helpers.mjs';

let server;
const tutorialClients = [];
const ours = [];
let restoreConsole;

before(async () => {
  server = await startServer();
  // The tutorial's client logs every connect and disconnect; keep test output readable.
  const { log, error } = console;
  console.log = (...args) => {
    if (typeof args[0] === 'string' && /^(Connected to server|Disconnected from server|Reconnecting in)/.test(args[0])) return;
    log(...args);
  };
  console.error = (...args) => {
    if (args[0] === 'WebSocket error:') return;
    error(...args);
  };
  restoreConsole = () => Object.assign(console, { log, error });
});

after(async () => {
  for (const c of tutorialClients) {
    c.maxReconnectAttempts = 0; // the tutorial's client has no close(): stop its reconnects
    c.ws?.close();
  }
  for (const c of ours) c.close();
  await sleep(50);
  restoreConsole?.();
  await server?.stop();
});

function tutorialClient(url) {
  const c = new TutorialClient(url);
  tutorialClients.push(c);
  // The tutorial's listener map, and its `connected` frame, as the tutorial's app would use it.
  c.on('connected', (m) => {
    c.clientId = m.clientId;
  });
  c.connect();
  return c;
}

test("the tutorial's client connects to the bare host and gets a clientId", async () => {
  const c = tutorialClient(server.rootUrl);
  await until(() => c.clientId, 5000, 'connected');
  assert.match(c.clientId, /^client-\d+-[a-z0-9]{9}$/);
});

test("the tutorial's clients exchange broadcasts; the sender gets none", async () => {
  const a = tutorialClient(server.rootUrl);
  const b = tutorialClient(server.url);
  await until(() => a.clientId && b.clientId, 5000, 'both connected');
  const atA = [];
  const atB = [];
  a.on('broadcast', (m) => atA.push(m));
  b.on('broadcast', (m) => atB.push(m));
  a.send('broadcast', { text: 'hello from a' });
  await until(() => atB.some((m) => m.data?.text === 'hello from a'), 5000, 'b gets the broadcast');
  const m = atB.find((x) => x.data?.text === 'hello from a');
  assert.equal(m.type, 'broadcast');
  assert.equal(m.senderId, a.clientId);
  assert.equal(typeof m.timestamp, 'number');
  b.send('broadcast', 'hello from b');
  await until(() => atA.some((x) => x.data === 'hello from b'), 5000, 'a gets the reply');
  await sleep(100);
  assert.ok(!atA.some((x) => x.data?.text === 'hello from a'), 'the sender got its own broadcast');
});

test("the tutorial's client and ours talk to each other", async () => {
  const t = tutorialClient(server.rootUrl);
  const o = new RealtimeClient(server.url);
  ours.push(o);
  await o.connect();
  await until(() => t.clientId, 5000, 'tutorial client connected');
  const got = once(o, 'broadcast', (m) => m.senderId === t.clientId);
  t.send('broadcast', 42);
  assert.equal((await got).data, 42);
  const atT = [];
  t.on('direct', (m) => atT.push(m));
  await o.direct(t.clientId, { to: 'tutorial' });
  await until(() => atT.length === 1, 5000, 'the direct message');
  assert.deepEqual(atT[0].data, { to: 'tutorial' });
});
