// Retake docs/screenshots/chat.png and dashboard.png under traffic, as a new
// user would see them with two instances on Redis: it starts a private
// redis-server and two instances of the debug build (or $SWITCHBOARD_BIN),
// three people chatting across them, and bounded background traffic
// (at most 60 s) while the dashboard fills.
//
// Usage (from clients/js, after `npm ci` and `cargo build`):
//   node --experimental-websocket screenshots.mjs
// Needs /usr/bin/chromium (or $CHROMIUM_PATH) and redis-server.

import { chromium } from 'playwright-core';

import { RealtimeClient } from './switchboard.js';
import { ARGS, CHROMIUM } from './test/browser-env.mjs';
import { sleep } from './test/helpers.mjs';
import { startRedis } from './test/redis.mjs';
import { startServer } from './test/server.mjs';

const out = new URL('../../docs/screenshots/', import.meta.url).pathname;
const redis = await startRedis();
const args = (id) => ['--bus', redis.url, '--instance-id', id];
const a = await startServer({ args: args('sb-a') });
const b = await startServer({ args: args('sb-b') });
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
const loadClients = [];

try {
  // Background traffic: 30 subscribers of one channel across both
  // instances, and a publisher on each, for the dashboard's figures.
  const channel = `load:screens-${Date.now().toString(36)}`;
  for (let i = 0; i < 30; i++) {
    const c = new RealtimeClient((i % 2 ? b : a).url);
    await c.connect();
    await c.subscribe(channel, () => {});
    loadClients.push(c);
  }
  let stop = false;
  const load = (async () => {
    const end = Date.now() + 60_000;
    for (let i = 0; !stop && Date.now() < end; i++) {
      const burst = 20 + 60 * Math.abs(Math.sin(i / 6));
      await Promise.all(Array.from({ length: burst }, (_, k) => loadClients[k % 2].publish(channel, { i, k }).catch(() => {})));
      await sleep(200);
    }
  })();

  const ctx = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const room = 'lobby';
  const page = async (server, nick) => {
    const p = await ctx.newPage();
    await p.goto(`${server.httpUrl}/demo/chat?room=${room}&nick=${encodeURIComponent(nick)}`);
    await p.waitForFunction(() => !document.getElementById('text').disabled);
    return p;
  };
  const alice = await page(a, 'Alice');
  const bob = await page(b, 'Bob');
  await page(a, 'Carol');
  for (const [p, text] of [
    [alice, 'Hi Bob, I am on instance sb-a.'],
    [bob, 'Hello Alice! sb-b here, over Redis.'],
    [alice, 'Presence shows names now, and history comes back on reload.'],
  ]) {
    await p.locator('#text').fill(text);
    await p.locator('#text').press('Enter');
    await p.locator('#messages li[data-send-state="sent"]', { hasText: text }).waitFor();
  }
  await alice.waitForFunction(() => document.querySelectorAll('#presence li').length === 3);
  await alice.screenshot({ path: `${out}chat.png` });

  const dash = await ctx.newPage();
  await dash.goto(`${a.httpUrl}/demo/dashboard`);
  await dash.waitForFunction(() => Number(document.getElementById('samples').textContent) >= 10, null, { timeout: 30_000 });
  await dash.screenshot({ path: `${out}dashboard.png`, fullPage: true });
  stop = true;
  await load;
  console.log(`wrote ${out}chat.png and ${out}dashboard.png`);
} finally {
  for (const c of loadClients) c.close();
  await browser.close();
  await a.stop();
  await b.stop();
  await redis.stop();
}
