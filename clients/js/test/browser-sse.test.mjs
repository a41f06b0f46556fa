// The SSE fallback in a real browser: the chat demo reached through a proxy
// that refuses every WebSocket upgrade and sends each request to the next of
// two instances on Redis (no affinity). The pages fall back to SSE by
// themselves, see each other and exchange messages; one instance is then
// killed and restarted, and every page shows every message published while
// it was away, once and in order.
//
// Chromium logs the refused upgrade ("WebSocket connection … failed") and the
// proxy's 502s while an instance is down as console errors of its own; those
// two are expected here, any other console error fails the test.
//
// Needs chromium (CHROMIUM_PATH, default /usr/bin/chromium), playwright-core
// (npm install in clients/js) and Redis on 127.0.0.1:6379.

import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { startProxy } from './proxy.mjs';
import { sleep } from './helpers.mjs';

import { ARGS, CHROMIUM, chromium, skipReason } from './browser-env.mjs';

const cleanup = [];
afterEach(async () => {
  while (cleanup.length) {
    try {
      await cleanup.pop()();
    } catch {
      // keep cleaning up
    }
  }
});

const EXPECTED_CONSOLE = [/WebSocket connection to .* failed/, /Failed to load resource.*(502|Bad Gateway)/, /net::ERR_/];

async function openChat(context, baseUrl, problems, name) {
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !EXPECTED_CONSOLE.some((re) => re.test(msg.text()))) {
      problems.push(`${name} console error: ${msg.text()}`);
    }
  });
  page.on('pageerror', (err) => problems.push(`${name} page error: ${err.message}`));
  const res = await page.goto(`${baseUrl}/demo/chat`);
  assert.equal(res.status(), 200, '/demo/chat is served');
  return page;
}

async function joinRoom(page, room, nick) {
  await page.getByLabel('Room name').fill(room);
  await page.getByLabel('Your name').fill(nick);
  await page.getByRole('button', { name: 'Join' }).click();
  await page.getByRole('heading', { name: `Room: ${room}` }).waitFor({ timeout: 15_000 });
  await page.waitForFunction(() => !document.getElementById('text').disabled, null, { timeout: 15_000 });
}

async function say(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByRole('button', { name: 'Send' }).click();
}

const shownTexts = (page) =>
  page.evaluate(() => [...document.querySelectorAll('#messages li[data-offset] .text')].map((e) => e.textContent));

async function waitForTexts(page, texts, what) {
  try {
    await page.waitForFunction(
      (want) => {
        const have = [...document.querySelectorAll('#messages li[data-offset] .text')].map((e) => e.textContent);
        return want.every((t) => have.includes(t));
      },
      texts,
      { timeout: 20_000 },
    );
  } catch (err) {
    err.message += `\n${what}: shown ${JSON.stringify(await shownTexts(page))}`;
    throw err;
  }
}

test(
  'chat pages behind a proxy that refuses WebSocket fall back to SSE, across two instances, and recover what they missed during a restart',
  { skip: skipReason || false, timeout: 120_000 },
  async () => {
    const prefix = `sbjs-bsse-${process.pid}-${Date.now().toString(36)}`;
    const args = ['--bus', 'redis://127.0.0.1:6379', '--bus-prefix', prefix];
    const argsOf = (i) => [...args, '--instance-id', `${prefix}-${i}`];
    const servers = [await startServer({ args: argsOf(0) }), await startServer({ args: argsOf(1) })];
    cleanup.push(() => Promise.all(servers.map((s) => s.stop(3000))));
    const proxy = await startProxy(servers.map((s) => s.port));
    cleanup.push(() => proxy.close());
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
    cleanup.push(() => browser.close());

    const problems = [];
    const room = `sse-${Date.now().toString(36)}`;
    const a = await openChat(await browser.newContext(), proxy.httpUrl, problems, 'page A');
    const b = await openChat(await browser.newContext(), proxy.httpUrl, problems, 'page B');
    await joinRoom(a, room, 'Alice');
    await joinRoom(b, room, 'Bob');
    for (const page of [a, b]) {
      assert.equal(await page.evaluate(() => window.switchboard.transport), 'sse');
    }
    assert.ok(proxy.upgradesRefused >= 2, 'each page tried WebSocket first');

    const before = ['Alice over SSE', 'Bob over SSE'];
    await say(a, before[0]);
    await waitForTexts(b, [before[0]], 'page B');
    await say(b, before[1]);
    for (const page of [a, b]) await waitForTexts(page, before, 'before the restart');

    // The instance holding page A's stream crashes: the pages whose stream it
    // held reconnect (through the proxy, to whichever instance answers);
    // messages published meanwhile on the other are recovered from the
    // shared history.
    const holder = await a.evaluate(() => window.switchboard.instanceId);
    const victim = holder === `${prefix}-0` ? 0 : 1;
    assert.equal(holder, `${prefix}-${victim}`);
    const survivor = servers[1 - victim];
    await servers[victim].kill();
    await a.locator('#status[data-state="reconnecting"]').first().waitFor({ timeout: 10_000 }).catch(() => {});
    const node = new RealtimeClient(survivor.url, { transports: ['websocket'] });
    cleanup.push(async () => node.close());
    await node.connect();
    const away = Array.from({ length: 10 }, (_, i) => `away ${i + 1}`);
    for (const text of away) await node.publish(`chat:${room}`, { text, name: 'Node' });
    await sleep(300);
    let restarted = null;
    for (let i = 0; i < 20 && !restarted; i++) {
      restarted = await startServer({ port: servers[victim].port, args: argsOf(victim) }).catch(() => null);
      if (!restarted) await sleep(100);
    }
    assert.ok(restarted, 'the instance restarts on its port');
    servers[victim] = restarted;
    for (const page of [a, b]) {
      await page.locator('#status[data-state="open"]').waitFor({ timeout: 20_000 });
      await waitForTexts(page, away, 'after the restart');
    }
    const after = 'Alice after the restart';
    await say(a, after);
    for (const page of [a, b]) await waitForTexts(page, [after], 'live after the restart');
    await sleep(300); // anything shown twice would show up by now
    for (const [name, page] of [['page A', a], ['page B', b]]) {
      assert.deepEqual(await shownTexts(page), [...before, ...away, after], `${name}: every message once, in order`);
      assert.equal(await page.evaluate(() => window.switchboard.transport), 'sse');
    }
    assert.deepEqual(problems, [], 'no unexpected console errors');
  },
);
