// Test helper: run the real Switchboard binary on a free loopback port.
//
// The binary is $SWITCHBOARD_BIN, or ../../target/debug/switchboard relative
// to clients/js (the repository's debug build). It is started with
// `--host 127.0.0.1 --port N` and is ready when GET /readyz answers 200.
//
//   const server = await startServer();          // a free port
//   server.url        // ws://127.0.0.1:N/ws
//   await server.stop();                         // SIGTERM, then SIGKILL after a grace period
//   await server.kill();                         // SIGKILL: a crash
//   const again = await startServer({ port: server.port }); // restart on the same port

import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const clientDir = path.resolve(here, '..');

/** Absolute path of the server binary under test. */
export function serverBinary() {
  const fromEnv = process.env.SWITCHBOARD_BIN;
  if (fromEnv) return path.resolve(fromEnv);
  return path.resolve(clientDir, '../../target/debug/switchboard');
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitReady(base, child, deadlineMs) {
  const deadline = Date.now() + deadlineMs;
  let lastError = null;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`switchboard exited early (${child.exitCode ?? child.signalCode})`);
    }
    try {
      const res = await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      if (res.status === 200) return;
      lastError = new Error(`/readyz answered ${res.status}`);
    } catch (err) {
      lastError = err;
    }
    await sleep(50);
  }
  throw new Error(`switchboard not ready within ${deadlineMs} ms: ${lastError?.message}`);
}

/**
 * Start the server. Options: `port` (default: a free one), `args` (extra
 * flags), `env` (extra environment), `readyTimeout` (ms, default 15000).
 */
export async function startServer(opts = {}) {
  const bin = serverBinary();
  if (!existsSync(bin)) {
    throw new Error(
      `switchboard binary not found at ${bin}: build it (cargo build) or set SWITCHBOARD_BIN`,
    );
  }
  // A port picked by freePort() may be taken by the time we bind: retry.
  for (let attempt = 0; ; attempt++) {
    const port = opts.port ?? (await freePort());
    const args = ['--host', '127.0.0.1', '--port', String(port), ...(opts.args || [])];
    const child = spawn(bin, args, {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...(opts.env || {}) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const log = [];
    const keep = (chunk) => {
      for (const line of chunk.toString().split('\n')) if (line) log.push(line);
      if (log.length > 500) log.splice(0, log.length - 500);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const base = `http://127.0.0.1:${port}`;
    try {
      await waitReady(base, child, opts.readyTimeout ?? 15_000);
    } catch (err) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      // Retry on a new port when ours was taken; not when a port was asked for
      // (a restart on the same port retries below, the old process may linger).
      const busy = log.some((l) => /address.*in use|EADDRINUSE|os error 98/i.test(l));
      if (busy && attempt < 20) {
        await sleep(100);
        continue;
      }
      err.message += `\n--- switchboard log ---\n${log.join('\n')}`;
      throw err;
    }
    return makeHandle({ child, port, base, log, exited });
  }
}

function makeHandle({ child, port, base, log, exited }) {
  let done = null;
  const stopWith = async (signal, graceMs) => {
    if (done) return done;
    done = (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
        const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
        const result = await exited;
        clearTimeout(timer);
        return result;
      }
      return exited;
    })();
    return done;
  };
  return {
    port,
    pid: child.pid,
    httpUrl: base,
    url: `ws://127.0.0.1:${port}/ws`,
    /** The bare host, as the tutorial's client uses it. */
    rootUrl: `ws://127.0.0.1:${port}`,
    log,
    /** Graceful stop: SIGTERM (the server drains), SIGKILL after `graceMs`. */
    stop: (graceMs = 10_000) => stopWith('SIGTERM', graceMs),
    /** A crash: SIGKILL. */
    kill: () => stopWith('SIGKILL', 0),
    /** Freeze the process (dead-peer tests); resolves once it is stopped. */
    pause: async () => {
      child.kill('SIGSTOP');
      for (let i = 0; i < 100; i++) {
        try {
          const stat = readFileSync(`/proc/${child.pid}/stat`, 'utf8');
          if (/^\d+ \(.*\) [Tt] /.test(stat)) return;
        } catch {
          break; // not Linux: just give the signal a moment
        }
        await sleep(10);
      }
      await sleep(50);
    },
    /** Thaw a paused process. */
    resume: () => child.kill('SIGCONT'),
  };
}
