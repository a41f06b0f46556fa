// Shared set-up of the browser tests: Debian's Chromium driven by
// playwright-core. Outside CI a missing browser skips the browser tests; in
// CI it is a failure, never a silent skip.
import { existsSync } from 'node:fs';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
];

let chromium = null;
let skipReason = null;
try {
  ({ chromium } = await import('playwright-core'));
} catch {
  skipReason = 'playwright-core is not installed (npm install in clients/js)';
}
if (!skipReason && !existsSync(CHROMIUM)) skipReason = `no chromium at ${CHROMIUM}`;
if (skipReason && process.env.CI) throw new Error(`browser tests cannot run in CI: ${skipReason}`);

export { chromium, skipReason };
