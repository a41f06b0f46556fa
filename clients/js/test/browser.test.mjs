// The chat demo in a real browser: two pages join one room, see each other in
// the presence list and exchange a message; no page logs a console error.
//
// Needs chromium (apt-get install -y chromium; or set CHROMIUM_PATH) and
// `npm install` in clients/js (playwright-core). Skipped when either is missing.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { startServer } from './server.mjs';

import { ARGS, CHROMIUM, chromium, skipReason } from './browser-env.mjs';

let server;
let browser;

before(async () => {
  if (skipReason) return;
  server = await startServer();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function openChat(context, problems, name) {
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`${name} console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`${name} page error: ${err.message}`));
  const res = await page.goto(`${server.httpUrl}/demo/chat`);
  assert.equal(res.status(), 200, '/demo/chat is served');
  return page;
}

async function joinRoom(page, room, nick) {
  await page.getByLabel('Room name').fill(room);
  await page.getByLabel('Your name').fill(nick);
  await page.getByRole('button', { name: 'Join' }).click();
  try {
    await page.getByRole('heading', { name: `Room: ${room}` }).waitFor({ timeout: 10_000 });
    // The message box is enabled once history and presence are loaded.
    await page.waitForFunction(() => !document.getElementById('text').disabled, null, { timeout: 10_000 });
  } catch (err) {
    const state = await page.evaluate(() => ({
      url: location.href,
      heading: document.getElementById('room-heading')?.textContent,
      status: document.getElementById('status')?.textContent,
      error: document.getElementById('error')?.textContent,
      client: window.switchboard ? window.switchboard.state : 'no client',
    }));
    err.message += `\npage state: ${JSON.stringify(state)}`;
    throw err;
  }
}

test('two chat pages join a room, see each other and exchange a message', { skip: skipReason || false, timeout: 60_000 }, async () => {
  const demo = await fetch(`${server.httpUrl}/demo/chat`);
  await demo.arrayBuffer();
  assert.equal(demo.status, 200, 'the server serves /demo/chat');

  const problems = [];
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  try {
    const a = await openChat(ctxA, problems, 'page A');
    const b = await openChat(ctxB, problems, 'page B');
    const room = `room-${Date.now().toString(36)}`;
    await joinRoom(a, room, 'Alice');
    await joinRoom(b, room, 'Bob');

    const idA = await a.evaluate(() => window.switchboard.clientId);
    const idB = await b.evaluate(() => window.switchboard.clientId);
    assert.ok(idA && idB && idA !== idB);

    // Each sees both members: A learns of B through a join event, B through presence.
    for (const page of [a, b]) {
      await page.waitForFunction(
        (ids) => ids.every((id) => document.querySelector(`#presence li[data-client-id="${id}"]`)),
        [idA, idB],
        { timeout: 10_000 },
      );
      assert.equal(await page.locator('#presence-count').textContent(), '2');
    }

    // Keyboard only: type the message and press Enter.
    await a.getByLabel('Message', { exact: true }).focus();
    await a.keyboard.type('hello from Alice');
    await a.keyboard.press('Enter');
    await b.locator('#messages li', { hasText: 'hello from Alice' }).waitFor({ timeout: 10_000 });
    await a.locator('#messages li', { hasText: 'hello from Alice' }).waitFor({ timeout: 10_000 });
    assert.equal(await a.locator('#messages li', { hasText: 'hello from Alice' }).count(), 1, 'shown once');

    await b.getByLabel('Message', { exact: true }).fill('hi Alice, Bob here');
    await b.getByRole('button', { name: 'Send' }).click();
    await a.locator('#messages li', { hasText: 'hi Alice, Bob here' }).waitFor({ timeout: 10_000 });
    assert.equal(await a.locator('#messages li .who', { hasText: 'Bob' }).count(), 1);

    // The message list announces additions to screen readers.
    assert.equal(await a.locator('#messages').getAttribute('aria-live'), 'polite');

    // A third page joining later gets the history.
    const ctxC = await browser.newContext();
    try {
      const c = await openChat(ctxC, problems, 'page C');
      await joinRoom(c, room, 'Carol');
      await c.locator('#messages li', { hasText: 'hello from Alice' }).waitFor({ timeout: 10_000 });
      await c.locator('#messages li', { hasText: 'hi Alice, Bob here' }).waitFor({ timeout: 10_000 });
      // B leaves: A's presence list drops it.
      await b.close();
      await a.waitForFunction((id) => !document.querySelector(`#presence li[data-client-id="${id}"]`), idB, { timeout: 10_000 });
    } finally {
      await ctxC.close();
    }
  } finally {
    await ctxA.close();
    await ctxB.close();
  }
  assert.deepEqual(problems, [], 'no console errors');
});

test('the dashboard shows the sys:metrics figures and draws its chart', { skip: skipReason || false, timeout: 60_000 }, async () => {
  const problems = [];
  const ctx = await browser.newContext();
  try {
    const page = await ctx.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
    });
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    const res = await page.goto(`${server.httpUrl}/demo/dashboard`);
    assert.equal(res.status(), 200, '/demo/dashboard is served');
    // The server publishes once a second; wait for two samples.
    await page.waitForFunction(() => Number(document.getElementById('samples').textContent) >= 2, null, { timeout: 10_000 });
    const connections = Number(await page.locator('#connections').textContent());
    assert.ok(connections >= 1, `connections shown: ${connections}`);
    assert.ok((await page.locator('#chart polyline').count()) >= 1, 'the chart has lines');
  } finally {
    await ctx.close();
  }
  assert.deepEqual(problems, [], 'no console errors');
});

test("the tutorial's own client, unchanged, connects and exchanges broadcasts in Chromium", { skip: skipReason || false, timeout: 60_000 }, async () => {
  // The class exactly as the tutorial prints it; only our `export` line is removed.
  const source = readFileSync(new URL('./tutorial-client.js', import.meta.url), 'utf8').replace(
    /^export \{ RealtimeClient \};$/m,
    '',
  );
  const problems = [];
  const context = await browser.newContext();
  const pages = [];
  for (const name of ['first', 'second']) {
    const page = await context.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error') problems.push(`${name} console error: ${msg.text()}`);
    });
    page.on('pageerror', (err) => problems.push(`${name} page error: ${err.message}`));
    // Same origin as the server; the tutorial connects to the bare host.
    await page.goto(`${server.httpUrl}/`);
    await page.addScriptTag({ content: `${source}\nwindow.RealtimeClient = RealtimeClient;` });
    await page.evaluate((url) => {
      window.received = [];
      window.ids = [];
      const client = new window.RealtimeClient(url);
      client.on('connected', (msg) => window.ids.push(msg.clientId));
      client.on('broadcast', (msg) => window.received.push(msg));
      client.connect();
      window.client = client;
    }, server.httpUrl.replace('http://', 'ws://'));
    await page.waitForFunction(() => window.ids.length === 1, null, { timeout: 10_000 });
    pages.push(page);
  }
  const [first, second] = pages;
  await first.evaluate(() => window.client.send('broadcast', { text: 'hello from the tutorial client' }));
  await second.waitForFunction(() => window.received.length === 1, null, { timeout: 10_000 });
  const got = await second.evaluate(() => window.received[0]);
  const firstId = await first.evaluate(() => window.ids[0]);
  assert.equal(got.type, 'broadcast');
  assert.deepEqual(got.data, { text: 'hello from the tutorial client' });
  assert.equal(got.senderId, firstId);
  await first.waitForTimeout(200);
  assert.equal(await first.evaluate(() => window.received.length), 0, 'the sender gets nothing');
  await context.close();
  assert.deepEqual(problems, []);
});
