// Issue 5, end to end in a real browser: the server is killed (SIGKILL) and
// restarted while chat pages are open. Each page reconnects by itself and, with
// history on, shows every message published while it was away, once and in
// order; the presence list recovers; no page logs a console error.
//
// With the in-memory bus a restarted server starts every channel in a new
// epoch, so the pages' resubscribe gets `recovered:false` and the chat page
// must fetch the new epoch's history. The messages "published while it was
// away" are the ones published after the restart and before the page gets
// back. To make that window deterministic the pages reach the server through
// a small TCP relay in this process: while it is held, new connections are
// accepted but parked (the browser's WebSocket handshake simply waits, as on a
// slow network) and are forwarded only once the restarted server has had the
// messages published to it. Nothing is mocked in the browser: the pages use
// Chromium's own WebSocket, and since a connection attempt is never refused
// Chromium has no "connection refused" error to log, so the test accepts no
// console error at all.
//
// Needs chromium (CHROMIUM_PATH, default /usr/bin/chromium) and playwright-core
// (npm install in clients/js). Skipped when either is missing.

import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';

import { RealtimeClient } from '../switchboard.js';
import { startServer } from './server.mjs';
import { sleep, until } from './helpers.mjs';

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

/**
 * A TCP relay on a free loopback port to 127.0.0.1:`targetPort`. `hold()`
 * parks new connections (accepted, nothing forwarded: the browser's handshake
 * waits); `release()` forwards the parked ones and every later one.
 * Established connections are relayed faithfully: an end is passed on as an
 * end, a reset as a reset.
 */
async function startRelay(targetPort) {
  let held = false;
  const parked = [];
  const sockets = new Set();

  const forward = (down, buffered = []) => {
    const up = net.connect(targetPort, '127.0.0.1');
    sockets.add(up);
    up.setNoDelay(true);
    for (const chunk of buffered) up.write(chunk);
    down.pipe(up);
    up.pipe(down);
    up.on('error', (err) => {
      if (err.code === 'ECONNRESET') down.resetAndDestroy();
      else down.destroy();
    });
    down.on('error', (err) => {
      if (err.code === 'ECONNRESET') up.resetAndDestroy();
      else up.destroy();
    });
    up.on('close', () => sockets.delete(up));
  };

  const server = net.createServer((down) => {
    sockets.add(down);
    down.on('close', () => sockets.delete(down));
    down.setNoDelay(true);
    if (!held) {
      forward(down);
      return;
    }
    // Read (and keep) what the browser sends, to tell WebSocket handshakes apart.
    const entry = { down, chunks: [], websocket: false };
    const onData = (chunk) => {
      entry.chunks.push(chunk);
      if (/^upgrade:\s*websocket/im.test(Buffer.concat(entry.chunks).toString('latin1'))) entry.websocket = true;
    };
    entry.onData = onData;
    down.on('data', onData);
    down.on('error', () => {});
    parked.push(entry);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return {
    port,
    httpUrl: `http://127.0.0.1:${port}`,
    hold() {
      held = true;
    },
    /** WebSocket handshakes waiting in the relay. */
    parkedWebSockets: () => parked.filter((e) => e.websocket && !e.down.destroyed).length,
    release() {
      held = false;
      for (const entry of parked.splice(0)) {
        entry.down.off('data', entry.onData);
        entry.down.pause();
        if (entry.down.destroyed) continue;
        forward(entry.down, entry.chunks);
      }
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

async function restartOnSamePort(port) {
  let lastErr;
  for (let i = 0; i < 20; i++) {
    try {
      return await startServer({ port });
    } catch (err) {
      lastErr = err;
      await sleep(100);
    }
  }
  throw lastErr;
}

async function openChat(context, baseUrl, problems, name) {
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      const where = msg.location()?.url || '?';
      problems.push(`${name} console error (${where}): ${msg.text()}`);
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
  await page.getByRole('heading', { name: `Room: ${room}` }).waitFor({ timeout: 10_000 });
  await page.waitForFunction(() => !document.getElementById('text').disabled, null, { timeout: 10_000 });
}

async function say(page, text) {
  await page.getByLabel('Message', { exact: true }).fill(text);
  await page.getByRole('button', { name: 'Send' }).click();
}

/** The publications a page shows, in display order (notices left out). */
function shownMessages(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('#messages li[data-offset]')].map((li) => ({
      epoch: li.dataset.epoch,
      offset: Number(li.dataset.offset),
      text: li.querySelector('.text').textContent,
    })),
  );
}

async function waitForTexts(page, texts, what) {
  try {
    await page.waitForFunction(
      (want) => {
        const have = [...document.querySelectorAll('#messages li[data-offset] .text')].map((e) => e.textContent);
        return want.every((t) => have.includes(t));
      },
      texts,
      { timeout: 15_000 },
    );
  } catch (err) {
    err.message += `\n${what}: shown ${JSON.stringify((await shownMessages(page)).map((m) => m.text))}`;
    throw err;
  }
}

async function waitForMembers(page, ids) {
  await page.waitForFunction(
    (want) => {
      const have = [...document.querySelectorAll('#presence li')].map((li) => li.dataset.clientId).sort();
      return JSON.stringify(have) === JSON.stringify([...want].sort());
    },
    ids,
    { timeout: 15_000 },
  );
}

// Messages published while the pages are away (the chat page once fetched only 50).
const AWAY = 60;

const clientId = (page) => page.evaluate(() => window.switchboard.clientId);
const connState = (page) => page.evaluate(() => window.switchboard.state);

test(
  'chat pages survive a server crash and restart: they reconnect, show every message published while away once and in order, and presence recovers',
  { skip: skipReason || false, timeout: 90_000 },
  async () => {
    let server = await startServer();
    cleanup.push(() => server.stop(3000));
    const relay = await startRelay(server.port);
    cleanup.push(() => relay.close());
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
    cleanup.push(() => browser.close());

    const problems = [];
    const room = `restart-${Date.now().toString(36)}`;
    const channel = `chat:${room}`;
    const a = await openChat(await browser.newContext(), relay.httpUrl, problems, 'page A');
    const b = await openChat(await browser.newContext(), relay.httpUrl, problems, 'page B');
    await joinRoom(a, room, 'Alice');
    await joinRoom(b, room, 'Bob');

    const before = ['Alice before the crash', 'Bob before the crash'];
    await say(a, before[0]);
    await waitForTexts(b, [before[0]], 'page B');
    await say(b, before[1]);
    for (const page of [a, b]) await waitForTexts(page, before, 'before the crash');
    const [oldA, oldB] = [await clientId(a), await clientId(b)];
    for (const page of [a, b]) await waitForMembers(page, [oldA, oldB]);
    const oldEpoch = (await shownMessages(a))[0].epoch;

    // Crash. The relay parks the pages' reconnect attempts.
    relay.hold();
    await server.kill();
    for (const page of [a, b]) {
      await page.locator('#status[data-state="reconnecting"]').waitFor({ timeout: 10_000 });
    }
    await until(() => relay.parkedWebSockets() >= 2, 10_000, 'both pages trying to reconnect');
    assert.equal(await connState(a), 'reconnecting');
    assert.equal(await connState(b), 'reconnecting');

    // Restart on the same port; publish while the pages are still away.
    server = await restartOnSamePort(server.port);
    // More than a screenful: the page must fetch all of them, not just a first page.
    const away = Array.from({ length: AWAY }, (_, i) => `away ${i + 1}`);
    const node = new RealtimeClient(server.url, { reconnectBaseDelay: 50, reconnectMaxDelay: 300 });
    cleanup.push(async () => node.close());
    await node.connect();
    for (const text of away) await node.publish(channel, { text, name: 'Node' });
    assert.equal(await connState(a), 'reconnecting', 'page A is still away while the messages are published');
    assert.equal(await connState(b), 'reconnecting', 'page B is still away while the messages are published');

    // Let the pages through: they reconnect by themselves.
    relay.release();
    for (const page of [a, b]) {
      await page.locator('#status[data-state="open"]').waitFor({ timeout: 15_000 });
      await waitForTexts(page, away, 'after the restart');
    }
    const [newA, newB] = [await clientId(a), await clientId(b)];
    assert.ok(newA && newB && newA !== oldA && newB !== oldB, 'new connections, new ids');

    // Presence recovers: the new ids, not the old ones.
    for (const page of [a, b]) {
      await waitForMembers(page, [newA, newB]);
      assert.equal(await page.locator('#presence-count').textContent(), '2');
    }

    // Live again, in both directions, through the page.
    const after = 'Bob after the restart';
    await say(b, after);
    const all = [...before, ...away, after];
    for (const page of [a, b]) await waitForTexts(page, [after], 'live after the restart');
    await sleep(300); // anything shown twice would show up by now

    for (const [name, page] of [['page A', a], ['page B', b]]) {
      const shown = await shownMessages(page);
      assert.deepEqual(
        shown.map((m) => m.text),
        all,
        `${name} shows every message once, in order`,
      );
      // The first two are from the old server's stream, the rest from the new one, offsets 1, 2, 3…
      assert.deepEqual(shown.slice(0, 2).map((m) => [m.epoch, m.offset]), [[oldEpoch, 1], [oldEpoch, 2]]);
      const newEpoch = shown[2].epoch;
      assert.notEqual(newEpoch, oldEpoch, 'the restarted server has a new epoch');
      assert.deepEqual(
        shown.slice(2).map((m) => [m.epoch, m.offset]),
        Array.from({ length: AWAY + 1 }, (_, i) => [newEpoch, i + 1]),
      );
      // The page said that what it had missed on the old server could not be recovered.
      assert.equal(await page.locator('#messages li.notice').count(), 1, `${name} shows one recovery notice`);
    }

    assert.deepEqual(problems, [], 'no console errors');
  },
);
