// The demo pages tell the truth, with two instances on one Redis (a private
// redis-server this file starts and stops):
// - the dashboard on each instance shows that instance's figures only (no
//   saw-tooth between instances), deliveries per second, and latency
//   percentiles that move with the traffic;
// - the chat shows display names (yours too), never client ids; a message
//   typed while the server is down is shown pending, then sent; when the bus
//   is down the status says so and the message is marked failed, with a retry.
//
// Needs chromium, playwright-core (see browser-env.mjs) and redis-server.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import { RealtimeClient } from '../switchboard.js';
import { ARGS, CHROMIUM, chromium, skipReason } from './browser-env.mjs';
import { sleep } from './helpers.mjs';
import { startRedis } from './redis.mjs';
import { startServer } from './server.mjs';

let redis;
let browser;
const servers = {};

function instanceArgs(id) {
  return ['--bus', redis.url, '--instance-id', id, '--history-size', '100'];
}

before(async () => {
  if (skipReason) return;
  redis = await startRedis();
  servers.a = await startServer({ args: instanceArgs('inst-a') });
  servers.b = await startServer({ args: instanceArgs('inst-b') });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
});

after(async () => {
  await browser?.close();
  for (const s of Object.values(servers)) await s?.stop();
  await redis?.stop();
});

async function openPage(context, problems, name, url, { allow = [] } = {}) {
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !allow.some((re) => re.test(msg.text()))) problems.push(`${name} console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`${name} page error: ${err.message}`));
  const res = await page.goto(url);
  assert.equal(res.status(), 200, `${url} is served`);
  return page;
}

/** Clients on both instances, subscribed to one channel, and a publisher on each: bounded traffic. */
async function traffic({ onA, onB, rate, seconds }) {
  const channel = `load:t${process.pid}-${Date.now().toString(36)}`;
  const clients = [];
  for (const [server, n] of [[servers.a, onA], [servers.b, onB]]) {
    for (let i = 0; i < n; i++) {
      const c = new RealtimeClient(server.url);
      await c.connect();
      await c.subscribe(channel, () => {});
      clients.push(c);
    }
  }
  const publishers = [clients[0], clients[clients.length - 1]];
  let stop = false;
  const done = (async () => {
    const end = Date.now() + seconds * 1000;
    let i = 0;
    while (!stop && Date.now() < end) {
      // A burst now and then, so the figures move.
      const burst = i % 3 === 0 ? rate : Math.ceil(rate / 10);
      await Promise.all(Array.from({ length: burst }, (_, k) => publishers[k % 2].publish(channel, { i, k }).catch(() => {})));
      i += 1;
      await sleep(250);
    }
  })();
  return {
    async close() {
      stop = true;
      await done;
      for (const c of clients) c.close();
    },
  };
}

test('the dashboard on each instance shows that instance only, deliveries per second and moving percentiles', { skip: skipReason || false, timeout: 90_000 }, async () => {
  const load = await traffic({ onA: 2, onB: 6, rate: 40, seconds: 40 });
  const problems = [];
  const ctx = await browser.newContext();
  try {
    const onA = await openPage(ctx, problems, 'dashboard A', `${servers.a.httpUrl}/demo/dashboard`);
    const onB = await openPage(ctx, problems, 'dashboard B', `${servers.b.httpUrl}/demo/dashboard`);
    // Both instances publish into sys:metrics (each has a dashboard); each
    // page names the other instance as "not shown".
    for (const [page, self, other] of [[onA, 'inst-a', 'inst-b'], [onB, 'inst-b', 'inst-a']]) {
      await page.waitForFunction(
        (o) => Number(document.getElementById('samples').textContent) >= 4 && document.getElementById('others').textContent.includes(o),
        other,
        { timeout: 20_000 },
      );
      assert.equal(await page.locator('#instance').textContent(), self);
      await page.locator('summary', { hasText: 'Recent samples' }).click();
      const rows = await page.locator('#table tr').evaluateAll((trs) => trs.map((tr) => ({
        instance: tr.dataset.instance,
        cells: [...tr.cells].map((td) => td.textContent),
      })));
      assert.ok(rows.length >= 4, `rows: ${rows.length}`);
      assert.deepEqual([...new Set(rows.map((r) => r.instance))], [self], 'every sample is from this instance');
      // Connections: 1 dashboard + 2 load clients on A, + 6 on B; one figure, not a saw-tooth.
      const want = self === 'inst-a' ? '3' : '7';
      assert.deepEqual([...new Set(rows.map((r) => r.cells[1]))], [want], `connections column ${JSON.stringify(rows)}`);
    }

    // Deliveries per second, labelled as such, non-zero under traffic.
    assert.equal(await onA.getByText('Deliveries per second', { exact: true }).first().isVisible(), true);
    assert.equal(await onA.getByText('Client frames in per second', { exact: true }).isVisible(), true);
    await onA.waitForFunction(() => Number(document.getElementById('rate').textContent.replace(/\D/g, '')) > 0, null, { timeout: 10_000 });

    // Percentiles are measured, not bucket bounds: they change from second to second.
    await onA.waitForFunction(() => {
      const p50s = [...document.querySelectorAll('#table tr')].map((tr) => tr.cells[4].textContent).filter((v) => v !== '–');
      return new Set(p50s).size >= 2;
    }, null, { timeout: 20_000 });
    const p50 = Number(await onA.locator('#p50').textContent());
    const p99 = Number(await onA.locator('#p99').textContent());
    assert.ok(p50 > 0 && p99 >= p50, `p50 ${p50} p99 ${p99}`);

    // The same histogram in Prometheus, from 10 µs.
    const prom = await (await fetch(`${servers.a.httpUrl}/metrics/prometheus`)).text();
    assert.match(prom, /^switchboard_delivery_latency_ms_bucket\{le="0\.01"\} \d+$/m);
    const count = Number(prom.match(/^switchboard_delivery_latency_ms_count (\d+)$/m)[1]);
    assert.ok(count > 0, 'observations');
  } finally {
    await ctx.close();
    await load.close();
  }
  assert.deepEqual(problems, [], 'no console errors');
});

async function waitForChat(page) {
  await page.waitForFunction(() => !document.getElementById('text').disabled, null, { timeout: 15_000 });
}

async function presenceNames(page) {
  return page.locator('#presence li').allTextContents();
}

async function say(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByLabel('Message', { exact: true }).press('Enter');
}

test('the chat shows names, pending messages while the server is down, and "bus unavailable"', { skip: skipReason || false, timeout: 120_000 }, async () => {
  const room = `names-${process.pid}-${Date.now().toString(36)}`;
  const problems = [];
  // Closing a socket to a killed server is reported by Chromium as a console error,
  // and so is the client's next attempt over its SSE fallback (a fetch) while the
  // server is still down: both are the outage this test makes on purpose.
  const allow = [/WebSocket connection to .* failed/, /Failed to load resource: net::ERR_CONNECTION_REFUSED/];
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  try {
    const alice = await openPage(ctxA, problems, 'Alice', `${servers.a.httpUrl}/demo/chat?room=${room}&nick=Alice`, { allow });
    const bob = await openPage(ctxB, problems, 'Bob', `${servers.b.httpUrl}/demo/chat?room=${room}&nick=Bob`, { allow });
    await waitForChat(alice);
    await waitForChat(bob);

    // Names, on both instances; your own marked; no client ids.
    for (const [page, me, other] of [[alice, 'Alice', 'Bob'], [bob, 'Bob', 'Alice']]) {
      await page.waitForFunction(() => document.querySelectorAll('#presence li').length === 2, null, { timeout: 10_000 });
      assert.deepEqual(await presenceNames(page), [`${me} (you)`, other]);
      assert.equal(await page.locator('#me').textContent(), me);
      const id = await page.evaluate(() => window.switchboard.clientId);
      const shortId = id.replace(/^client-\d+-/, '');
      assert.ok(!(await page.locator('aside').textContent()).includes(shortId), 'no client id in the member list');
    }
    await say(alice, 'hello Bob');
    await bob.locator('#messages li', { hasText: 'hello Bob' }).locator('.who', { hasText: 'Alice' }).waitFor({ timeout: 10_000 });
    await alice.locator('#messages li[data-send-state="sent"]', { hasText: 'hello Bob' }).waitFor({ timeout: 10_000 });

    // Alice's instance dies: the page reconnects, and what she types waits, visibly.
    const port = servers.a.port;
    await servers.a.kill();
    await alice.waitForFunction(() => ['reconnecting', 'connecting'].includes(document.getElementById('status').dataset.state), null, { timeout: 10_000 });
    await say(alice, 'typed while the server was down');
    const pending = alice.locator('#messages li', { hasText: 'typed while the server was down' });
    await pending.and(alice.locator('li[data-send-state="pending"]')).waitFor({ timeout: 5_000 });
    assert.match(await pending.locator('.state').textContent(), /pending/);
    assert.match(await alice.locator('#status').textContent(), /1 message waiting to be sent/);
    servers.a = await startServer({ port, args: instanceArgs('inst-a') });
    await pending.and(alice.locator('li[data-send-state="sent"]')).waitFor({ timeout: 30_000 });
    await bob.locator('#messages li', { hasText: 'typed while the server was down' }).waitFor({ timeout: 10_000 });
    assert.equal(await alice.locator('#messages li', { hasText: 'typed while the server was down' }).count(), 1, 'shown once');

    // The bus goes down: both instances stay up, publishes fail, and the page says why.
    await alice.waitForFunction(() => document.getElementById('status').dataset.state === 'open', null, { timeout: 10_000 });
    await redis.stop();
    await say(alice, 'sent during the bus outage');
    const failed = alice.locator('#messages li', { hasText: 'sent during the bus outage' });
    await failed.and(alice.locator('li[data-send-state="failed"]')).waitFor({ timeout: 20_000 });
    assert.match(await failed.locator('.state').textContent(), /bus is unavailable/);
    await alice.waitForFunction(() => document.getElementById('status').dataset.state === 'bus-unavailable', null, { timeout: 5_000 });
    assert.match(await alice.locator('#status').textContent(), /bus is unavailable/);

    // The bus comes back: the status clears by itself; Retry sends it.
    await redis.start();
    await alice.waitForFunction(() => document.getElementById('status').dataset.state === 'open', null, { timeout: 45_000 });
    await failed.getByRole('button', { name: 'Retry' }).click();
    await alice.locator('#messages li[data-send-state="sent"]', { hasText: 'sent during the bus outage' }).waitFor({ timeout: 20_000 });
    await bob.locator('#messages li', { hasText: 'sent during the bus outage' }).waitFor({ timeout: 20_000 });
  } finally {
    await ctxA.close();
    await ctxB.close();
  }
  assert.deepEqual(problems, [], 'no console errors');
});
