// Take screenshots of the demo pages into docs/screenshots/.
// Usage (from clients/js, after npm ci): node screenshots.mjs http://127.0.0.1:PORT
import { chromium } from 'playwright-core';

const base = process.argv[2];
const out = new URL('../../docs/screenshots/', import.meta.url).pathname;
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run'],
});
const ctx = await browser.newContext({ viewport: { width: 1100, height: 720 } });
const alice = await ctx.newPage();
const bob = await ctx.newPage();
await alice.goto(`${base}/demo/chat?room=lobby&nick=alice`);
await bob.goto(`${base}/demo/chat?room=lobby&nick=bob`);
await alice.waitForTimeout(1000);
for (const [page, text] of [[alice, 'Hi Bob, this is Switchboard.'], [bob, 'Hello! Presence and history work.'], [alice, 'Reload me: history comes back.']]) {
  const box = page.locator('#text');
  await box.waitFor({ state: 'visible' });
  await page.waitForFunction(() => !document.querySelector('#text').disabled);
  await box.fill(text);
  await box.press('Enter');
  await page.waitForTimeout(300);
}
await alice.waitForTimeout(800);
await alice.screenshot({ path: `${out}chat.png` });
const dash = await ctx.newPage();
await dash.goto(`${base}/demo/dashboard`);
await dash.waitForTimeout(6000);
await dash.screenshot({ path: `${out}dashboard.png` });
await browser.close();
